"""runserver's supervisor in a process of its own (single-threaded, as runserver is), with small parts:
output prefixed line by line, a dead part restarted, SIGTERM ends every part."""

import os
import signal
import subprocess
import sys
import threading

from hacer.settings import PROJECT_DIR

SUPERVISOR = """
import os, signal, sys
from ops.supervisor import Part, Supervisor

def short():
    os.write(1, b"first\\nhalf a ")
    os.write(2, b"line\\n")
    os.write(2, b"unfinished")  # a last line without its newline: ended by the supervisor
    raise SystemExit(3)

def sleeper():
    os.write(1, b"up\\n")
    signal.pause()

supervisor = Supervisor([Part(name, {"short": short}.get(name, sleeper)) for name in sys.argv[1:]])
signal.signal(signal.SIGTERM, supervisor.stop)
supervisor.run()
"""


def start(*parts: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, *parts], cwd=PROJECT_DIR, stderr=subprocess.PIPE, text=True
    )
    timer = threading.Timer(60, process.kill)  # a supervisor that never says what the test waits for
    timer.daemon = True
    timer.start()
    return process


def read_until(process: subprocess.Popen, done) -> list[str]:
    lines = []
    for line in process.stderr:
        lines.append(line)
        if done(lines):
            return lines
    raise AssertionError(f"the supervisor ended first: {''.join(lines)}")


def test_output_is_prefixed_and_a_dead_part_restarted():
    supervisor = start("short")
    lines = read_until(supervisor, lambda lines: sum("short exited with 3; restarting it" in x for x in lines) == 2)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(30) == 0
    text = "".join(lines)
    assert text.count("   short | first\n   short | half a line\n   short | unfinished\n") == 2, text


def test_sigterm_ends_every_part():
    supervisor = start("sleeper", "other")
    read_until(supervisor, lambda lines: {"sleeper | up\n", "other | up\n"} <= {x.lstrip() for x in lines})
    with open(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children") as children:
        parts = [int(pid) for pid in children.read().split()]
    assert len(parts) == 2
    for pid in parts:
        with open(f"/proc/{pid}/comm") as comm:
            assert comm.read().strip() in ("hacer-sleeper", "hacer-other")
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(30) == 0
    assert not [pid for pid in parts if os.path.exists(f"/proc/{pid}")], "a part outlived its supervisor"


RACE = """
import os, signal, sys, time
from ops.supervisor import Part, Supervisor

part = Part("sleeper", lambda: time.sleep(30))
supervisor = Supervisor([part], prefixed=False)
signal.signal(signal.SIGTERM, supervisor.stop)  # as runserver does: inherited by a fork
for attempt in range(20):
    supervisor._start(part)
    os.kill(part.pid, signal.SIGTERM)  # at once, as a stop during a part's restart does
    deadline = time.monotonic() + 5
    while (ended := os.waitpid(part.pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # a child's end has no event to wait on here
    if ended[0] == 0:
        os.kill(part.pid, signal.SIGKILL)
        sys.exit(f"attempt {attempt}: the part lived on after SIGTERM")
    supervisor._close_output(part)
    part.pid = 0
print("each ended")
"""


def test_a_stop_signal_sent_the_moment_a_part_starts_ends_it():
    outcome = subprocess.run([sys.executable, "-c", RACE], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=150)
    assert outcome.returncode == 0 and "each ended" in outcome.stdout, outcome.stderr
