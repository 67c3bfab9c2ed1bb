"""How the runner starts scripts: forked by the fork server or started cold, with real processes.

A forked run must be indistinguishable from a cold one to its script (what it sees, how it
ends), start from an interpreter no other run touched, and die with the fork server.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from runner.launcher import ForkedProcess, Launcher

from support import wait_until

PROBE = """\
import json, os, random, sys
import scripting
seen = {
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "path0": sys.path[0],
    "name": __name__,
    "file": __file__,
    "env": sorted(os.environ),
    "run_id": os.environ.get("HACER_RUN_ID"),
    "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
    "stdin": sys.stdin.read(),
    "own_group": os.getpgrp() == os.getpid(),
    "leaks": [hasattr(scripting, "leak"), "LEAK" in os.environ, "leaked_module" in sys.modules],
    "random": random.random(),
}
print(json.dumps(seen))
# What a run could leave for the next one, if runs shared an interpreter.
scripting.leak = True
os.environ["LEAK"] = "1"
sys.modules["leaked_module"] = scripting
"""

ENDING = """\
import atexit, sys, threading, time
atexit.register(lambda: print("atexit hook ran", flush=True))
def late():
    time.sleep(0.3)
    print("thread finished", flush=True)
threading.Thread(target=late).start()
left_open = open(sys.argv[1], "w")
left_open.write("written, never closed")
print("exiting", flush=True)
sys.exit("a message on stderr")
"""


@pytest.fixture
def launcher():
    launchers = []

    def make(fork_server: bool = True, **options) -> Launcher:
        made = Launcher(sys.executable, {"PATH": os.environ["PATH"]}, fork_server=fork_server, **options)
        made.start()
        launchers.append(made)
        return made

    yield make
    for made in launchers:
        made.stop()


def run(launcher: Launcher, script: Path, *params: str, run_id: str = "run-1") -> tuple[str, int, str]:
    """Run a script to its end: its output, exit code and launch token."""
    process, token, _ = launcher.launch(run_id, script, params)
    assert process.stdout is not None
    output = process.stdout.read().decode()
    process.stdout.close()
    return output, process.wait(30), token


def test_a_forked_run_sees_what_a_cold_one_sees_and_nothing_of_the_runs_before(launcher, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    cold = launcher(fork_server=False)
    forked = launcher()
    outputs = {}
    for name, which in (("cold", cold), ("forked", forked), ("forked again", forked)):
        output, code, token = run(which, script, "a b", "ü", run_id=f"run-{name}")
        assert code == 0, output
        outputs[name] = json.loads(output)
        assert outputs[name]["run_id"] == f"run-{name}"
    assert forked.forked == 2 and cold.cold == 1
    first, second = outputs["forked"], outputs["forked again"]
    assert second["leaks"] == [False, False, False], "a run saw what the run before it left"
    assert first["random"] != second["random"], "two forked runs drew the same random numbers"
    for seen in (first, second):
        assert {key: seen[key] for key in seen if key not in ("run_id", "random")} == {
            key: outputs["cold"][key] for key in seen if key not in ("run_id", "random")
        }
    assert first["argv"] == [str(script), "a b", "ü"] and first["cwd"] == str(tmp_path)
    assert first["stdin"] == "" and first["own_group"] and first["fds"] == [0, 1, 2, 3]


def test_a_forked_run_ends_as_a_started_one_does(launcher, tmp_path):
    script = tmp_path / "ending.py"
    script.write_text(ENDING)
    results = {}
    for name, which in (("cold", launcher(fork_server=False)), ("forked", launcher())):
        left_open = tmp_path / f"left-{name}"
        output, code, _ = run(which, script, str(left_open))
        results[name] = (output.splitlines(), code, left_open.read_text())
    assert results["forked"] == results["cold"]
    lines, code, written = results["forked"]
    assert code == 1 and written == "written, never closed"
    assert lines[0] == "exiting" and set(lines[1:]) == {"thread finished", "atexit hook ran", "a message on stderr"}


def test_a_forked_run_carries_its_token_where_a_fork_without_exec_inherits_it(launcher, tmp_path):
    script = tmp_path / "twin.py"
    script.write_text(
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    null = os.open(os.devnull, os.O_RDWR)\n"
        "    for fd in (0, 1, 2):\n"
        "        os.dup2(null, fd)\n"
        "    time.sleep(30)\n"
        "    os._exit(0)\n"
        "environ = open(f'/proc/{pid}/environ', 'rb').read().split(b'\\0')\n"  # as the runner reads it
        "print(pid, [v.decode() for v in environ if v.startswith(b'HACER_LAUNCH=')], flush=True)\n"
    )
    output, code, token = run(launcher(), script)
    twin, seen = output.split(" ", 1)
    assert seen.strip() == repr([f"HACER_LAUNCH={token}"])
    wait_until(lambda: not Path(f"/proc/{twin}/stat").exists(), 5, "the twin ended with its run")


def test_runs_die_with_the_fork_server_and_the_next_runs_start_cold_then_forked_again(launcher, tmp_path):
    blocking = tmp_path / "block.py"
    blocking.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    quick = tmp_path / "quick.py"
    quick.write_text("print('quick')\n")
    forked = launcher(restart_after=0.0)
    process, _, _ = forked.launch("blocked", blocking, ())
    assert isinstance(process, ForkedProcess) and process.stdout is not None
    assert process.stdout.readline() == b"started\n"
    server = forked._server
    assert server is not None
    server.kill()
    assert process.wait(10) == -signal.SIGKILL
    assert process.stdout.read() == b""  # the run's process is gone with the server: its pipe closed
    assert run(forked, quick)[:2] == ("quick\n", 0) and forked.cold == 1  # while the new server imports
    wait_until(lambda: forked.ready, 15, "the new fork server to be ready")
    assert run(forked, quick)[:2] == ("quick\n", 0) and forked.forked == 2


def test_the_fork_server_dies_with_the_runner(tmp_path):
    """A runner killed outright takes its fork server and spare along (PR_SET_PDEATHSIG)."""
    runner = tmp_path / "a_runner.py"
    runner.write_text(
        "import os, sys, time\n"
        "from runner.launcher import Launcher\n"
        "launcher = Launcher(sys.executable, {'PATH': os.environ['PATH']})\n"
        "launcher.start()\n"
        "print(launcher._server.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    import subprocess

    from hacer.settings import PROJECT_DIR

    child = subprocess.Popen(
        [sys.executable, str(runner)], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)}
    )
    assert child.stdout is not None
    server = int(child.stdout.readline())
    spares = wait_until(lambda: Path(f"/proc/{server}/task/{server}/children").read_text().split(), 10, "a spare")
    child.kill()
    child.wait()
    for pid in (server, *map(int, spares)):
        wait_until(lambda p=pid: not _alive(p), 10, f"process {pid} to die with the runner")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_spare_killed_while_it_waits_is_replaced_and_runs_stay_forked(launcher, tmp_path):
    quick = tmp_path / "quick.py"
    quick.write_text("print('quick')\n")
    forked = launcher()
    server = forked._server
    assert server is not None
    spares = wait_until(
        lambda: Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split(), 10, "a spare"
    )
    os.kill(int(spares[0]), signal.SIGKILL)
    wait_until(lambda: not _alive(int(spares[0])), 10, "the spare to die")
    assert run(forked, quick)[:2] == ("quick\n", 0)  # cold if the dead spare's exit was not told yet
    for _ in range(2):
        before = forked.forked
        assert run(forked, quick)[:2] == ("quick\n", 0)
        assert forked.forked == before + 1


def _waiting_for_go(pid: int) -> bool:
    """Tell whether a spare is in recv(), waiting for its go (recvfrom; recv_fds, before, is recvmsg)."""
    recvfrom = {"x86_64": 45, "aarch64": 207}[os.uname().machine]
    with open(f"/proc/{pid}/syscall") as current:
        return current.read().split()[0] == str(recvfrom)


def test_a_prepared_run_runs_none_of_its_script_before_go_and_none_at_all_when_let_go(launcher, tmp_path):
    script = tmp_path / "mark.py"
    script.write_text("import sys\nopen(sys.argv[1], 'w').write('ran')\nprint('ran', flush=True)\n")
    forked = launcher()
    marks = {"go": tmp_path / "went", "let go": tmp_path / "let-go"}
    outcome = {}
    for word, mark in marks.items():
        process, _, _ = forked.prepare(f"run-{word}", script, (str(mark),))
        wait_until(lambda p=process: _waiting_for_go(p.pid), 10, "the spare waiting for its go")
        assert not mark.exists()
        (process.go if word == "go" else process.let_go)()
        outcome[word] = (process.stdout.read(), process.wait(10), mark.exists())
        process.stdout.close()
    assert outcome == {"go": (b"ran\n", 0, True), "let go": (b"", 0, False)}


def test_a_run_too_large_to_hand_off_starts_cold_and_the_spare_waits_for_the_next(launcher, tmp_path):
    script = tmp_path / "count.py"
    script.write_text("import sys\nprint(sum(len(param) for param in sys.argv[1:]))\n")
    forked = launcher()
    spare = forked._spare
    large = ("x" * 100_000, "y" * 100_000)  # over the hand-off's limit together, each under Linux's for one argument
    assert run(forked, script, *large)[:2] == ("200000\n", 0) and (forked.cold, forked.forked) == (1, 0)
    process, _, _ = forked.launch("run-2", script, ("z",))
    assert spare is not None and process.pid == spare.pid
    assert process.stdout is not None and process.stdout.read() == b"1\n" and process.wait(10) == 0
    process.stdout.close()
