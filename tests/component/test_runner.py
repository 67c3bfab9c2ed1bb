"""The runner as a process: real mosquitto, real script subprocesses, emulated nodes via the bridge."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid

import pytest

from emulator.nodes import Emulator, make_nodes
from hacer import runstates
from hacer.messages import LogEntry, Presence, RunnerState, RunRequest, RunStatus
from hacer.settings import PROJECT_DIR, Settings

from support import wait_until

TEST_SCRIPTS = {
    "crash": "raise ValueError('boom')\n",
    "broken": "print('never')\ndef (\n",
    "block": (  # blocks until the test opens its FIFO for writing
        "import sys\nprint('waiting', sys.argv[1], flush=True)\nopen(sys.argv[1]).read()\nprint('released')\n"
    ),
    "family": (  # leaves a child and a grandchild behind, records their pids, then waits
        "import subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '1000'])\n"
        "grand = subprocess.Popen([sys.executable, '-c', 'import subprocess; "
        'p = subprocess.Popen(["sleep", "1000"]);'
        " print(p.pid, flush=True); p.wait()'], stdout=subprocess.PIPE, text=True)\n"
        "import os\n"
        "pids = [os.getpid(), child.pid, grand.pid, int(grand.stdout.readline())]\n"
        "open(sys.argv[1], 'w').write(' '.join(map(str, pids)))\n"
        "print('family ready', flush=True)\n"
        "time.sleep(1000)\n"
    ),
    "spam": ("import sys\nn = int(sys.argv[1])\nw = sys.stdout.write\nfor i in range(n):\n    w(f'line {i}\\n')\n"),
    "noeol": "import sys\nsys.stdout.write('x' * int(sys.argv[1]))\n",
    "echo": "import sys\nprint(repr(sys.argv[1:]))\n",
    "exit3": "import sys\nprint('bye')\nsys.exit(3)\n",
    "mark": "import sys\nopen(sys.argv[1], 'w').write('ran')\nprint('ran')\n",
}


@pytest.fixture
def scripts_dir(tmp_path):
    folder = tmp_path / "scripts"
    shutil.copytree(PROJECT_DIR / "scripts", folder)
    for name, text in TEST_SCRIPTS.items():
        (folder / f"{name}.py").write_text(text)
    return folder


@pytest.fixture
def runner_env(hacer_env, scripts_dir):
    hacer_env.update(
        {
            "HACER_SCRIPTS_DIR": str(scripts_dir),
            "HACER_RUNNER_ID": f"r-{uuid.uuid4().hex[:6]}",
            "HACER_CANCEL_GRACE": "1",
            "HACER_RUNNER_TAKEOVER": "3",
            "HACER_OFFLINE_AFTER": "30",
        }
    )
    return hacer_env


class Runs:
    """Every run status and log entry on the bus, by run id."""

    def __init__(self, watcher):
        self.watcher = watcher

    def statuses(self, run_id):
        return [RunStatus.from_payload(m.payload) for m in self.watcher.topic(f"hacer/runs/{run_id}/status")]

    def entries(self, run_id):
        return [LogEntry.from_payload(m.payload) for m in self.watcher.topic(f"hacer/runs/{run_id}/log")]

    def wait_state(self, run_id, states, timeout=20):
        states = {states} if isinstance(states, str) else set(states)
        message = self.watcher.wait_for(
            lambda m: m.topic == f"hacer/runs/{run_id}/status" and RunStatus.from_payload(m.payload).state in states,
            timeout=timeout,
        )
        return RunStatus.from_payload(message.payload)

    def wait_finished(self, run_id, timeout=20):
        status = self.wait_state(run_id, runstates.FINISHED_STATES, timeout)
        if status.state != runstates.LOST:  # the exit_status entry is published before the status
            self.watcher.wait_for(
                lambda m: (
                    m.topic == f"hacer/runs/{run_id}/log"
                    and LogEntry.from_payload(m.payload).entry_type == "exit_status"
                ),
                timeout=5,
            )
        return status

    def wait_entry(self, run_id, predicate, timeout=20):
        message = self.watcher.wait_for(
            lambda m: m.topic == f"hacer/runs/{run_id}/log" and predicate(LogEntry.from_payload(m.payload)),
            timeout=timeout,
        )
        return LogEntry.from_payload(message.payload)

    def log_of(self, run_id):
        entries, seen = [], {}
        for entry in self.entries(run_id):  # QoS 1 may deliver an entry twice: the same entry
            if entry.seq in seen:
                assert entry == seen[entry.seq], "two different entries with one seq"
                continue
            seen[entry.seq] = entry
            entries.append(entry)
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1)), "gaps or disorder in the log"
        return [(e.entry_type, e.data) for e in entries]


@pytest.fixture
def runs(make_bus):
    # A durable session, so what the runner publishes while this watcher is away (a broker
    # restart) still reaches it.
    from support import Watcher

    bus = make_bus(clean_start=False, session_expiry=600)
    watcher = Watcher(bus, "hacer/runs/#")
    bus.sync()
    return Runs(watcher)


@pytest.fixture
def start_runner(spawn, runner_env, watch):
    states = watch("hacer/runners/+/state")

    def start(runner_id=None, **env):
        rid = runner_id or f"r-{uuid.uuid4().hex[:6]}"
        child_env = {**runner_env, **env, "HACER_RUNNER_ID": rid}
        seen = len(states.messages)
        child = spawn(["runner"], child_env, name=f"runner-{rid}")
        states.wait_for(
            lambda m: m.topic == f"hacer/runners/{rid}/state" and RunnerState.from_payload(m.payload).state == "online",
            timeout=20,
            start=seen,
        )
        child.runner_id = rid
        return child

    start.states = states
    return start


@pytest.fixture
def requester(make_bus):
    bus = make_bus()

    def request(script, params=(), run_id=None, **fields):
        run_id = run_id or uuid.uuid4().hex[:12]
        bus.publish("hacer/runs/request", RunRequest(script, tuple(params), run_id, "test", **fields).to_payload())
        return run_id

    request.bus = bus
    return request


@pytest.fixture
def named_nodes(spawn, runner_env, make_bus, watch):
    """The bridge and one emulated node of each type, named as the api would name them."""
    presence = watch("hacer/nodes/+/presence")
    bridge_state = watch("hacer/bridge/state")
    spawn(["bridge"], runner_env)
    # Online once its beacon socket is bound: the emulator's first beacons are then heard, not
    # the ones a beacon interval later.
    bridge_state.wait_for(lambda m: m.payload == b"online", timeout=20)
    nodes = make_nodes(
        4,
        ["toggle", "light_rgb", "thermostat", "sensor_temp"],
        port=int(runner_env["HACER_NODE_PORT"]),
        interval=5,
        first_ip="127.0.0.60",
        base_id=uuid.uuid4().int % 10**9,
    )
    emulator = Emulator(nodes, ("127.0.0.1", int(runner_env["HACER_DISCOVERY_PORT"])))
    emulator.start()
    for node in nodes:
        presence.wait_for(lambda m, n=node: Presence.from_payload(m.payload).id == n.id, timeout=15)
    bus = make_bus()
    names = ["outlet1", "desk", "hall", "cellar"]
    for node, name in zip(nodes, names, strict=True):
        bus.publish(
            f"hacer/nodes/{node.id}/meta", json.dumps({"id": node.id, "name": name, "type": node.type}), retain=True
        )
    bus.sync()
    yield dict(zip(names, nodes, strict=True))
    emulator.stop()


def test_2015_scripts_against_emulated_nodes(named_nodes, start_runner, requester, runs):
    start_runner()
    toggle = requester("toggle", ["outlet1", "1"])
    assert runs.wait_finished(toggle).state == runstates.SUCCEEDED
    assert named_nodes["outlet1"].values["on"] == 1
    launch, *rest = runs.log_of(toggle)
    assert launch == ("launch", json.dumps({"script": "toggle", "params": ["outlet1", "1"]}))
    outlet = named_nodes["outlet1"]
    assert rest == [
        ("output", f"node 'outlet1' is node {outlet.id} (toggle at {outlet.ip})"),  # which node the name took
        ("sent_set", '"on": "1"'),
        ("result", "+i1e"),
        ("exit_status", "success"),
    ]

    gettemp = requester("gettemp", ["hall"])
    assert runs.wait_finished(gettemp).exit_code == 0
    assert runs.log_of(gettemp)[2:] == [
        ("sent_get", '"temperature"'),
        ("result", "+i21e"),
        ("output", "21"),
        ("exit_status", "success"),
    ]

    settarget = requester("settarget", ["hall", "23"])
    assert runs.wait_finished(settarget).state == runstates.SUCCEEDED
    assert named_nodes["hall"].values["target"] == 23

    setcolor = requester("setcolor", ["desk", "#00ff80"])
    assert runs.wait_finished(setcolor).state == runstates.SUCCEEDED
    assert named_nodes["desk"].values["color"] == 0x00FF80
    assert ("result", "+15:Key Set Success") in runs.log_of(setcolor)

    test = requester("test", ["anything", "a b"])
    assert runs.wait_finished(test).state == runstates.SUCCEEDED
    assert ("output", "test script running with ['anything', 'a b']") in runs.log_of(test)


def test_failures_inside_the_with_block_fail_the_run(named_nodes, start_runner, requester, runs):
    start_runner()
    read_only = requester("settarget", ["cellar", "5"])  # sensor_temp has no target
    status = runs.wait_finished(read_only)
    assert (status.state, status.exit_code) == (runstates.FAILED, 1)
    log = runs.log_of(read_only)
    assert ("exception", "InvalidCommand: target: Key Not Found") in log
    assert log[-1] == ("exit_status", "failed") and [t for t, _ in log].count("exit_status") == 1

    unknown = requester("gettemp", ["nowhere"])
    status = runs.wait_finished(unknown)
    assert status.state == runstates.FAILED
    assert ("exception", "NodeNotConnected: no node named 'nowhere'") in runs.log_of(unknown)


def test_a_2015_script_file_runs_unchanged(named_nodes, start_runner, requester, runs, scripts_dir):
    (scripts_dir / "oldstyle.py").write_text(
        "from hasapi import NodeConnection\n"
        "with NodeConnection() as conn:          # connects to the node named by the first parameter\n"
        '    conn.setVal("on", conn.params[0])   # params = the parameters after the node name\n'
        '    t = conn.getVal("on")\n'
        "    conn.log(t)                         # an `output` log entry\n"
    )
    start_runner()
    run_id = requester("oldstyle", ["outlet1", "1"])
    assert runs.wait_finished(run_id).state == runstates.SUCCEEDED
    assert runs.log_of(run_id)[2:] == [
        ("sent_set", '"on": "1"'),
        ("result", "+i1e"),
        ("sent_get", '"on"'),
        ("result", "+i1e"),
        ("output", "1"),
        ("exit_status", "success"),
    ]


def test_new_scripts_all_off_and_report(named_nodes, start_runner, requester, runs):
    named_nodes["outlet1"].values["on"] = 1
    start_runner()
    all_off = requester("all_off", ["toggle"])
    assert runs.wait_finished(all_off).state == runstates.SUCCEEDED
    assert named_nodes["outlet1"].values["on"] == 0
    assert ("output", "outlet1: off") in runs.log_of(all_off)
    report = requester("nodes_report")
    assert runs.wait_finished(report).state == runstates.SUCCEEDED
    lines = [data for kind, data in runs.log_of(report) if kind == "output"]
    hall = named_nodes["hall"]
    assert f"{hall.id} hall thermostat {hall.ip} online" in lines


def test_uncaught_exception_is_an_entry(start_runner, requester, runs):
    start_runner()
    run_id = requester("crash")
    status = runs.wait_finished(run_id)
    assert (status.state, status.exit_code) == (runstates.FAILED, 1)
    log = runs.log_of(run_id)
    assert ("exception", "ValueError: boom") in log
    assert ("output", "Traceback (most recent call last):") in log


@pytest.mark.parametrize("fork_server", ["1", "0"])
def test_a_script_that_does_not_compile_fails_with_its_error(start_runner, requester, runs, fork_server):
    # Forked, its SyntaxError once went up into the fork server's loop, in the run's process.
    start_runner(HACER_RUNNER_FORK_SERVER=fork_server)
    run_id = requester("broken")
    status = runs.wait_finished(run_id)
    assert (status.state, status.exit_code) == (runstates.FAILED, 1)
    log = runs.log_of(run_id)
    assert ("exception", "SyntaxError: invalid syntax (broken.py, line 2)") in log
    assert ("output", "never") not in log
    assert runs.wait_finished(requester("exit3")).exit_code == 3  # the runner and its fork server go on


@pytest.mark.parametrize(
    "script",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "toggle; rm -rf /",
        "$(touch pwned)",
        "scripts/../test",
        "../scripts/test",
        "test\0x",
    ],
)
def test_bad_script_names_are_refused_and_nothing_spawned(start_runner, requester, runs, script, tmp_path):
    start_runner()
    run_id = requester(script)
    status = runs.wait_finished(run_id)
    assert status.state == runstates.FAILED
    log = runs.log_of(run_id)
    assert log[0][0] == "exception" and log[-1] == ("exit_status", "failed")
    assert not any(kind == "launch" for kind, _ in log)
    assert not (tmp_path / "pwned").exists() and not (PROJECT_DIR / "pwned").exists()


def test_shell_metacharacters_in_params_stay_text(start_runner, requester, runs, tmp_path):
    start_runner()
    marker = tmp_path / "pwned"
    params = [f"; touch {marker}", f"$(touch {marker})", f"`touch {marker}`", "a\nb", "*"]
    run_id = requester("echo", params)
    assert runs.wait_finished(run_id).state == runstates.SUCCEEDED
    assert ("output", repr(params)) in runs.log_of(run_id)
    assert not marker.exists()


def test_bad_requests_get_a_failed_status(start_runner, requester, runs):
    start_runner()
    for body in [
        '{"script": "test", "params": "notalist"}',
        "not json",
        '{"script": "test", "params": [{}]}',
        json.dumps({"script": "test", "params": ["x"] * 100}),
    ]:
        requester.bus.publish("hacer/runs/request", body)

    def statuses():
        return [RunStatus.from_payload(m.payload) for m in runs.watcher.messages if m.topic.endswith("/status")]

    wait_until(lambda: len(statuses()) >= 4, what="four failed statuses")
    assert [s.state for s in statuses()] == [runstates.FAILED] * 4
    assert all(s.error.startswith("bad run request") for s in statuses())


def fifo(tmp_path, name):
    path = tmp_path / f"{name}.fifo"
    os.mkfifo(path)
    return path


def release(path):
    with open(path, "w") as pipe:
        pipe.write("go")


def test_concurrency_limit_and_queue_order(start_runner, requester, runs, tmp_path):
    runner = start_runner(HACER_RUNNER_CAPACITY="2")
    pipes = [fifo(tmp_path, f"p{i}") for i in range(5)]
    run_ids = [requester("block", [str(p)]) for p in pipes]
    runs.wait_state(run_ids[0], runstates.RUNNING)
    runs.wait_state(run_ids[1], runstates.RUNNING)
    states = start_runner.states
    states.wait_for(lambda m: RunnerState.from_payload(m.payload).queued == 3)
    for index in range(5):
        release(pipes[index])
        assert runs.wait_finished(run_ids[index]).state == runstates.SUCCEEDED
        if index + 2 < 5:  # the one freed place goes to the oldest waiting run, and to it only
            runs.wait_state(run_ids[index + 2], runstates.RUNNING)
            later = [s.state for r in run_ids[index + 3 :] for s in runs.statuses(r)]
            assert runstates.RUNNING not in later
    assert (
        max(
            RunnerState.from_payload(m.payload).running.__len__()
            for m in states.messages
            if m.topic == f"hacer/runners/{runner.runner_id}/state"
        )
        == 2
    )


def test_cancel_ends_the_whole_process_group(start_runner, requester, runs, tmp_path):
    start_runner()
    pid_file = tmp_path / "pids"
    run_id = requester("family", [str(pid_file)])
    runs.wait_entry(run_id, lambda e: e.data == "family ready")
    pids = [int(p) for p in pid_file.read_text().split()]
    assert all(_alive(pid) for pid in pids)
    requester.bus.publish(f"hacer/runs/{run_id}/cancel", b"")
    status = runs.wait_finished(run_id)
    assert status.state == runstates.CANCELLED
    wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=5, what="the script's children to die")


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead, waiting for its parent
            return stat.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while read
        return False


def test_time_limit(start_runner, requester, runs, tmp_path):
    start_runner()
    run_id = requester("block", [str(fifo(tmp_path, "never"))], timeout=0.5)
    status = runs.wait_finished(run_id)
    assert status.state == runstates.TIMED_OUT and "time limit" in status.error
    assert runs.log_of(run_id)[-1] == ("exit_status", "failed")


def test_bounded_output(start_runner, requester, runs):
    start_runner()
    run_id = requester("noeol", ["3000000"])  # 3 MB with no newline
    assert runs.wait_finished(run_id).state == runstates.SUCCEEDED
    outputs = [data for kind, data in runs.log_of(run_id) if kind == "output"]
    assert len(outputs[0]) < 9000 and "more bytes of this line cut" in outputs[0]
    assert "output cut" in outputs[-1]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_runners_200_requests_each_run_exactly_once(start_runner, requester, runs, database, request):
    env = {"HACER_DATABASE_URL": request.getfixturevalue("postgres_url")} if database == "postgresql" else {}
    first, second = start_runner(**env), start_runner(**env)
    run_ids = [requester("test", [str(i)]) for i in range(200)]
    finished = [runs.wait_finished(r, timeout=60) for r in run_ids]
    assert all(s.state == runstates.SUCCEEDED for s in finished), [
        s for s in finished if s.state != runstates.SUCCEEDED
    ][:3]
    assert {s.runner for s in finished} == {first.runner_id, second.runner_id}
    for run_id in run_ids:
        assert [e for e, _ in runs.log_of(run_id)].count("launch") == 1
    # a duplicate delivery of an accepted request is not run again
    again = requester("test", ["0"], run_id=run_ids[0])
    marker = requester("test", ["marker"])
    runs.wait_finished(marker)
    assert [s.state for s in runs.statuses(again)].count(runstates.RUNNING) == 1


def test_requests_sent_while_the_runner_is_down_run_when_it_returns(start_runner, requester, runs):
    runner = start_runner()
    assert runner.stop() == 0, runner.output()
    run_ids = [requester("test", [str(i)]) for i in range(5)]
    start_runner(runner.runner_id)
    for run_id in run_ids:
        assert runs.wait_finished(run_id).state == runstates.SUCCEEDED


def test_runner_killed_mid_run_is_lost(start_runner, requester, runs, tmp_path):
    doomed = start_runner()
    start_runner()  # the survivor that notices
    pipes = [fifo(tmp_path, f"k{i}") for i in range(2)]
    run_ids = [requester("block", [str(p)]) for p in pipes]
    running = [r for r in run_ids if runs.wait_state(r, runstates.RUNNING).runner == doomed.runner_id]
    assert running, "the shared subscription gave the doomed runner nothing"
    doomed.stop(kill=True)
    for run_id in running:
        status = runs.wait_finished(run_id)
        assert status.state == runstates.LOST and doomed.runner_id in status.error
    for pipe, run_id in zip(pipes, run_ids, strict=True):
        if run_id not in running:
            release(pipe)
            assert runs.wait_finished(run_id).state == runstates.SUCCEEDED


def test_restarted_runner_reports_its_old_run_lost(start_runner, requester, runs, tmp_path):
    runner = start_runner()
    pid_file = tmp_path / "pids"
    run_id = requester("family", [str(pid_file)])
    runs.wait_entry(run_id, lambda e: e.data == "family ready")
    family = [int(pid) for pid in pid_file.read_text().split()]
    runner.stop(kill=True)
    wait_until(lambda: not _alive(family[0]), timeout=5, what="the script to die with its runner")
    start_runner(runner.runner_id)
    status = runs.wait_finished(run_id)
    assert status.state == runstates.LOST
    # Its log goes on where it stopped and says how far the run got; a lost run is not run again.
    log = runs.log_of(run_id)
    assert [kind for kind, _ in log] == ["launch", "output", "exception", "exit_status"]
    assert "it had started; 1 line of output, the last: 'family ready'" in log[2][1]
    assert "not run again" in log[2][1] and status.error == log[2][1]
    # A runner run by hand has no one above it to end its script's children (runserver and systemd
    # do: test_manage.py, deploy/systemd): this test ends them itself, not to leave them behind.
    for pid in family[1:]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_queued_run_whose_script_was_removed_fails_on_restart(start_runner, requester, runs, tmp_path, scripts_dir):
    runner = start_runner(HACER_RUNNER_CAPACITY="1")
    (scripts_dir / "doomed.py").write_text("print('never')\n")
    blocker = requester("block", [str(fifo(tmp_path, "q"))])
    runs.wait_state(blocker, runstates.RUNNING)
    queued = requester("doomed")
    runs.wait_state(queued, runstates.QUEUED)
    runner.stop(kill=True)
    (scripts_dir / "doomed.py").unlink()
    start_runner(runner.runner_id)
    status = runs.wait_finished(queued)
    assert status.state == runstates.FAILED and "doomed" in status.error
    assert runs.wait_finished(blocker).state == runstates.LOST


def test_broker_restart_during_a_run_keeps_its_log_whole(start_runner, requester, runs, broker, tmp_path):
    start_runner()
    pipe = fifo(tmp_path, "b")
    run_id = requester("block", [str(pipe)])
    runs.wait_entry(run_id, lambda e: e.data.startswith("waiting"))
    broker.restart()
    threading.Thread(target=release, args=(pipe,), daemon=True).start()
    status = runs.wait_finished(run_id, timeout=30)
    assert status.state == runstates.SUCCEEDED
    log = runs.log_of(run_id)
    assert [kind for kind, _ in log] == ["launch", "output", "output", "exit_status"]
    assert log[2] == ("output", "released")


def test_a_script_requests_another_run_and_uses_the_modern_library(
    named_nodes, start_runner, requester, runs, scripts_dir
):
    (scripts_dir / "chain.py").write_text(
        "from hacer import scripting\n"
        "hall = scripting.node('hall')\n"
        "scripting.log(f'{hall.name} {hall.type} online={hall.online}')\n"
        "scripting.log(scripting.get(hall.id, 'temperature', timeout=5))\n"
        "try:\n"
        "    scripting.get('cellar', 'nothing')\n"
        "except scripting.CommandFailed as exc:\n"
        "    scripting.log(f'refused: {exc.result.reason} {exc}')\n"
        "scripting.log('child ' + scripting.request_run('test', ['from-chain']))\n"
    )
    start_runner()
    run_id = requester("chain")
    assert runs.wait_finished(run_id).state == runstates.SUCCEEDED
    outputs = [data for kind, data in runs.log_of(run_id) if kind == "output"]
    took = [line for line in outputs if line.startswith("node '")]  # each lookup says which node it took, once
    hall, cellar = named_nodes["hall"], named_nodes["cellar"]
    assert took == [
        f"node 'hall' is node {hall.id} (thermostat at {hall.ip})",
        f"node 'cellar' is node {cellar.id} (sensor_temp at {cellar.ip})",
    ]
    outputs = [line for line in outputs if line not in took]
    assert outputs[:3] == ["hall thermostat online=True", "21", "refused: node_error Key Not Found"]
    child = outputs[3].removeprefix("child ")
    status = runs.wait_finished(child)
    assert status.state == runstates.SUCCEEDED and status.requested_by == f"script:{run_id}"
    assert ("output", "test script running with ['from-chain']") in runs.log_of(child)


MANAGE_RUN = [sys.executable, str(PROJECT_DIR / "manage.py"), "run"]


def manage_run(runner_env, *args):
    return subprocess.run([*MANAGE_RUN, *args], env=runner_env, capture_output=True, text=True, timeout=60)


def start_manage_run(runner_env, *args, stdout=subprocess.PIPE):
    return subprocess.Popen([*MANAGE_RUN, *args], env=runner_env, stdout=stdout, stderr=subprocess.PIPE, text=True)


def test_the_run_command_follows_the_log_and_exits_with_the_runs_code(start_runner, runner_env):
    start_runner()
    done = manage_run(runner_env, "echo", "a b", "-1", "; rm -rf /")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "['a b', '-1', '; rm -rf /']\n"
    assert "[launch]" in done.stderr and "succeeded" in done.stderr
    failed = manage_run(runner_env, "exit3")
    assert (failed.returncode, failed.stdout) == (3, "bye\n")
    assert "failed" in failed.stderr
    unknown = manage_run(runner_env, "no_such_script")
    assert unknown.returncode == 1 and "no script named 'no_such_script'" in unknown.stderr


def test_the_run_command_detached_prints_the_run_id(start_runner, runner_env, runs):
    start_runner()
    done = manage_run(runner_env, "--detach", "echo", "x")
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    status = runs.wait_finished(run_id)
    assert (status.state, status.requested_by) == (runstates.SUCCEEDED, "cli")


def test_the_run_command_says_when_no_runner_takes_the_run(runner_env):
    child = start_manage_run(runner_env, "echo", stdout=None)
    try:
        assert child.stderr.readline().startswith("run ")
        assert "no runner has taken run" in child.stderr.readline()
    finally:
        child.kill()
        child.wait()


def test_the_run_command_prints_an_entry_delivered_twice_once(start_runner, runner_env, runs, requester, tmp_path):
    start_runner()
    pipe = fifo(tmp_path, "d")
    child = start_manage_run(runner_env, "block", str(pipe))
    try:
        run_id = child.stderr.readline().split()[1].rstrip(":")
        assert child.stdout.readline().startswith("waiting")
        waiting = runs.wait_entry(run_id, lambda e: e.data.startswith("waiting"))
        requester.bus.publish(f"hacer/runs/{run_id}/log", waiting.to_payload())  # as a redelivery would
        release(pipe)
        assert child.wait(30) == 0
        assert child.stdout.read() == "released\n"
    finally:
        child.kill()
        child.wait()


def test_a_ctrl_c_while_an_entry_is_printed_still_cancels_the_run(start_runner, broker, topics, tmp_path):
    # The signal lands inside the write of the script's first line, the moment the subprocess test
    # below sends it; as a KeyboardInterrupt there it ended the command and left the run going.
    from hacer.bus import Bus
    from runner.request import request_run

    class InterruptedOutput(io.StringIO):
        def write(self, text):
            if text.startswith("waiting"):
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(text)

    start_runner()
    out, err = InterruptedOutput(), io.StringIO()
    handler_before = signal.getsignal(signal.SIGINT)
    bus = Bus(broker.url, topics, f"test-cli-{uuid.uuid4().hex[:8]}")
    try:
        code = request_run(bus, "block", [str(fifo(tmp_path, "i"))], out=out, err=err)
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C ended the command instead of cancelling the run")
    finally:
        bus.stop()
    assert code == 1
    assert "cancelling run" in err.getvalue() and err.getvalue().rstrip().endswith(" cancelled"), err.getvalue()
    assert signal.getsignal(signal.SIGINT) is handler_before


def test_ctrl_c_on_the_run_command_cancels_the_run(start_runner, runner_env, tmp_path):
    start_runner()
    child = start_manage_run(runner_env, "block", str(fifo(tmp_path, "c")))
    try:
        assert child.stdout.readline().startswith("waiting")
        child.send_signal(signal.SIGINT)
        assert child.wait(30) == 1
        err = child.stderr.read()
        assert "cancelling run" in err and err.rstrip().endswith(" cancelled"), err
    finally:
        child.kill()


# --- fences, refusals, resends (issue: nothing lost, exactly once) ----------------------------


def runner_database(env):
    from hacer.models import Database
    from hacer.settings import Settings

    return Database(Settings.from_env(env).database_url)


def test_a_forged_offline_message_takes_nothing_over(start_runner, requester, runs, tmp_path, runner_env):
    # Runner A holds 4 running and 2 queued runs; anyone publishes "A is offline" on its topic.
    first = start_runner(HACER_RUNNER_CAPACITY="4")
    pipes = [fifo(tmp_path, f"f{i}") for i in range(6)]
    run_ids = [requester("block", [str(p)]) for p in pipes]
    for run_id in run_ids[:4]:
        runs.wait_state(run_id, runstates.RUNNING)
    second = start_runner(HACER_RUNNER_CAPACITY="4")
    forged = RunnerState(first.runner_id, "offline").to_payload()
    requester.bus.publish(f"hacer/runners/{first.runner_id}/state", forged, retain=True)
    # Nothing to await: takeover would come within HACER_RUNNER_TAKEOVER (3 s); give it twice that.
    threading.Event().wait(2 * float(runner_env["HACER_RUNNER_TAKEOVER"]))
    for pipe in pipes:
        release(pipe)
    finished = [runs.wait_finished(r, timeout=30) for r in run_ids]
    assert [s.state for s in finished] == [runstates.SUCCEEDED] * 6
    assert {s.runner for s in finished} == {first.runner_id}, "the forged message moved runs"
    for run_id in run_ids:
        assert [e for e, _ in runs.log_of(run_id)].count("launch") == 1
        assert runstates.LOST not in [s.state for s in runs.statuses(run_id)]
    assert second.process.poll() is None


def test_a_runner_alone_writes_no_heartbeats_and_one_that_joins_takes_nothing_from_it(
    start_runner, requester, runs, tmp_path, runner_env
):
    from sqlalchemy import select

    from hacer.models import RunnerHeartbeat

    takeover = float(runner_env["HACER_RUNNER_TAKEOVER"])
    first = start_runner()
    pipe = fifo(tmp_path, "alone")
    run_id = requester("block", [str(pipe)])
    runs.wait_state(run_id, runstates.RUNNING)
    database = runner_database(runner_env)

    def beats() -> dict[str, int]:
        with database.engine.connect() as connection:
            return dict(connection.execute(select(RunnerHeartbeat.runner_id, RunnerHeartbeat.beat)).tuples().all())

    alone = beats()[first.runner_id]
    # Nothing to await: a beat would come every HACER_RUNNER_TAKEOVER / 4 (0.75 s); give it 2 s.
    threading.Event().wait(2.0)
    assert beats()[first.runner_id] == alone  # no disk write for no one
    second = start_runner()
    wait_until(lambda: beats()[first.runner_id] > alone, 2 * takeover, "the first runner to beat for the second")
    threading.Event().wait(2 * takeover)  # a takeover would have come by now
    release(pipe)
    status = runs.wait_finished(run_id, timeout=30)
    assert (status.state, status.runner) == (runstates.SUCCEEDED, first.runner_id)
    assert second.process.poll() is None


def test_a_runner_that_stops_beating_is_taken_over_and_ends_a_run_taken_from_it(
    start_runner, requester, runs, tmp_path, runner_env
):
    # A frozen runner (SIGSTOP: no heartbeat, still connected) loses its runs to the other; when
    # it wakes up it finds its claim taken, kills that run and publishes nothing more of it.
    frozen = start_runner(HACER_RUNNER_CAPACITY="1")
    pid_file = tmp_path / "pids"
    held = requester("family", [str(pid_file)])
    runs.wait_entry(held, lambda e: e.data == "family ready")
    script_pid = int(pid_file.read_text().split()[0])
    waiting = requester("test", ["after"])
    runs.wait_state(waiting, runstates.QUEUED)
    survivor = start_runner()
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        lost = runs.wait_finished(held, timeout=30)
        assert lost.state == runstates.LOST and lost.runner == survivor.runner_id
        resumed = runs.wait_finished(waiting, timeout=30)
        assert resumed.state == runstates.SUCCEEDED and resumed.runner == survivor.runner_id
    finally:
        frozen.process.send_signal(signal.SIGCONT)
    wait_until(lambda: not _alive(script_pid), 20, "the taken run's script to be ended by its old runner")
    marker = requester("test", ["marker"])
    runs.wait_finished(marker)
    assert [s.state for s in runs.statuses(held)][-1] == runstates.LOST, "the old runner reported the run"
    assert "taken over" in frozen.output()


def test_a_request_reusing_a_live_run_id_cannot_write_into_it(start_runner, requester, runs, tmp_path):
    start_runner()
    pipe = fifo(tmp_path, "live")
    live = requester("block", [str(pipe)])
    runs.wait_entry(live, lambda e: e.data.startswith("waiting"))
    requester("no_such_script", run_id=live)
    requester.bus.publish("hacer/runs/request", json.dumps({"run_id": live, "script": ""}))
    marker = requester("test", ["marker"])
    runs.wait_finished(marker)
    release(pipe)
    assert runs.wait_finished(live).state == runstates.SUCCEEDED
    # A run that starts at once (a worker was free) is never `queued`; a status may come twice
    # (sent again from the outbox after the runner's connect), never another run's.
    states = [s.state for s in runs.statuses(live)]
    assert [s for i, s in enumerate(states) if states[i - 1 : i] != [s]] == [runstates.RUNNING, runstates.SUCCEEDED]
    assert [kind for kind, _ in runs.log_of(live)] == ["launch", "output", "output", "exit_status"]


def test_a_bad_request_with_a_readable_run_id_gets_its_failed_status(start_runner, requester, runs):
    start_runner()
    requester.bus.publish("hacer/runs/request", json.dumps({"run_id": "empty-script", "script": ""}))
    status = runs.wait_finished("empty-script")
    assert status.state == runstates.FAILED and "script" in status.error
    assert [kind for kind, _ in runs.log_of("empty-script")] == ["exception", "exit_status"]


def test_a_locked_database_fails_the_request_with_its_reason(start_runner, requester, runs, runner_env):
    import sqlite3

    start_runner(HACER_DATABASE_TIMEOUT="0.2")
    lock = sqlite3.connect(runner_env["HADB_PATH"], isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        run_id = requester("test", ["x"])
        status = runs.wait_finished(run_id, timeout=30)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert status.state == runstates.FAILED and "database" in status.error
    after = requester("test", ["y"])
    assert runs.wait_finished(after).state == runstates.SUCCEEDED


def test_the_run_command_sends_its_request_until_a_runner_takes_it(start_runner, runner_env, tmp_path):
    # No runner has ever subscribed on this broker, so the first request is dropped by the broker.
    follow = subprocess.Popen(
        [sys.executable, str(PROJECT_DIR / "manage.py"), "run", "test", "late"],
        env=runner_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        follow.stderr.readline()  # "run <id>: test late": the request is out
        start_runner()
        out, err = follow.communicate(timeout=60)
    finally:
        follow.kill()
    assert follow.returncode == 0, err
    assert "late" in out


@pytest.mark.parametrize("fork_server", ["1", "0"])
def test_runs_are_forked_by_the_fork_server_or_started_by_the_runner_when_it_is_off(
    scripts_dir, start_runner, requester, runs, fork_server
):
    (scripts_dir / "parent.py").write_text("import os\nprint(os.getppid())\n")
    runner = start_runner(HACER_RUNNER_FORK_SERVER=fork_server)
    parents = set()
    for _ in range(3):
        run_id = requester("parent")
        assert runs.wait_finished(run_id).state == runstates.SUCCEEDED
        parents |= {int(data) for kind, data in runs.log_of(run_id) if kind == "output"}
    runner_pid = runner.process.pid
    if fork_server == "1":  # each run a child of the fork server, itself the runner's child
        (server,) = parents
        assert server != runner_pid and f"PPid:\t{runner_pid}\n" in open(f"/proc/{server}/status").read()
    else:
        assert parents == {runner_pid}


def test_a_claim_that_does_not_reach_the_disk_runs_none_of_its_script(
    runner_env, requester, runs, watch, tmp_path, monkeypatch
):
    """The spare gets a run ready while its claim is synced; if the sync fails, the run fails, its script unrun."""
    from hacer.models import CommitSync
    from runner.main import build_runner

    sync, failures = CommitSync.__call__, []

    def sync_or_fail(self):
        if failures:
            raise failures.pop()
        sync(self)

    monkeypatch.setattr(CommitSync, "__call__", sync_or_fail)
    monkeypatch.setattr(sys, "setswitchinterval", lambda interval: None)  # the runner's, not pytest's
    runner = build_runner(Settings.from_env(runner_env))
    states = watch(f"hacer/runners/{runner.config.runner_id}/state")
    runner.start()
    try:
        states.wait_for(lambda m: RunnerState.from_payload(m.payload).state == "online", timeout=20)
        mark = tmp_path / "ran"
        failures.append(OSError(5, "Input/output error"))
        failed = runs.wait_finished(requester("mark", [str(mark)]))
        assert failed.state == runstates.FAILED and "OSError" in failed.error
        assert runner.launcher.forked == 1  # it was handed to the spare, which was let go:
        wait_until(lambda: not runner.launcher._forked, 10, "the spare's exit")
        assert not mark.exists()
        assert runs.wait_finished(requester("mark", [str(mark)])).state == runstates.SUCCEEDED
        assert mark.read_text() == "ran" and runner.launcher.forked == 2
    finally:
        runner.stop()
