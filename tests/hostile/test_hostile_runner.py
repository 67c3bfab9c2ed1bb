"""One curious script against the runner: leftovers outside its group, the runner's secrets."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from hacer import runstates
from hacer.settings import PROJECT_DIR

from support import wait_until
from test_runner import requester, runner_env, runs, scripts_dir, start_runner  # noqa: F401 - fixtures

ESCAPE = (  # a child in a session of its own keeps the run's stdout open; its pid goes to a file
    "import subprocess, sys, time\n"
    "child = subprocess.Popen(['setsid', 'sleep', '300'])\n"
    "open(sys.argv[1], 'w').write(str(child.pid))\n"
    "print('escaped', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
)


HIDE = (  # a grandchild in a session of its own, with no environment and none of the run's files
    "import subprocess, sys, time\n"
    "subprocess.run(['sh', '-c', 'env -i setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! > ' + sys.argv[1]])\n"
    "print('hidden', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while read
        return False


def test_a_child_that_leaves_the_process_group_ends_with_the_run(
    scripts_dir,
    start_runner,
    runs,  # noqa: F811
    requester,
    tmp_path,
):
    (scripts_dir / "escape.py").write_text(ESCAPE)
    start_runner()
    for pause, timeout, expected in (("0", None, runstates.SUCCEEDED), ("300", 2.0, runstates.TIMED_OUT)):
        pid_file = tmp_path / f"pid-{uuid.uuid4().hex[:6]}"
        run_id = f"escape-{uuid.uuid4().hex[:6]}"
        requester("escape", (str(pid_file), pause), run_id=run_id, **({"timeout": timeout} if timeout else {}))
        started = time.monotonic()
        assert runs.wait_finished(run_id, timeout=20).state == expected
        assert time.monotonic() - started < 15
        pid = int(pid_file.read_text())
        wait_until(lambda p=pid: not alive(p), 5, "the escaped child to be gone")
        assert ("output", "escaped") in runs.log_of(run_id)


@pytest.mark.parametrize("fork_server", ["1", "0"])
def test_a_descendant_that_drops_the_runs_group_environment_and_files_ends_with_it(
    fork_server,
    scripts_dir,
    start_runner,
    runs,  # noqa: F811
    requester,
    tmp_path,
):
    (scripts_dir / "hide.py").write_text(HIDE)
    start_runner(HACER_RUNNER_FORK_SERVER=fork_server)
    for pause, timeout, expected in (
        ("0", None, runstates.SUCCEEDED),
        ("300", 2.0, runstates.TIMED_OUT),
        ("300", None, runstates.CANCELLED),
    ):
        pid_file = tmp_path / f"pid-{uuid.uuid4().hex[:6]}"
        run_id = f"hide-{uuid.uuid4().hex[:6]}"
        requester("hide", (str(pid_file), pause), run_id=run_id, **({"timeout": timeout} if timeout else {}))
        if expected == runstates.CANCELLED:
            runs.watcher.wait_for(lambda m, r=run_id: m.topic == f"hacer/runs/{r}/log" and b"hidden" in m.payload)
            requester.bus.publish(f"hacer/runs/{run_id}/cancel", b"")
        assert runs.wait_finished(run_id, timeout=20).state == expected
        pid = int(wait_until(lambda p=pid_file: p.exists() and p.read_text().strip(), 5, "the hidden pid"))
        wait_until(lambda p=pid: not alive(p), 5, f"the hidden grandchild to be gone ({expected})")


def test_scripts_see_no_secret_of_the_runner(scripts_dir, start_runner, runs, requester, runner_env):  # noqa: F811
    (scripts_dir / "environ.py").write_text("import os\nfor k, v in sorted(os.environ.items()):\n    print(k, v)\n")
    broker = runner_env["HACER_MQTT_URL"]
    start_runner(
        HACER_API_TOKEN="api-secret",
        HACER_DATABASE_URL=f"sqlite:///{scripts_dir}/db-secret.db",
        HACER_MQTT_URL=broker.replace("mqtt://", "mqtt://hacer-runner:runner-secret@"),
        MY_SITE_VARIABLE="kept",
        HACER_SCRIPT_ENV="MY_SITE_VARIABLE",
    )
    run_id = f"env-{uuid.uuid4().hex[:6]}"
    requester("environ", run_id=run_id)
    assert runs.wait_finished(run_id).state == runstates.SUCCEEDED
    seen = dict(line.split(" ", 1) for kind, line in runs.log_of(run_id) if kind == "output")
    assert "secret" not in " ".join(f"{k} {v}" for k, v in seen.items())
    assert seen["HACER_MQTT_URL"] == broker and seen["HACER_RUN_ID"] == run_id
    assert seen["MY_SITE_VARIABLE"] == "kept"
    assert not {"HACER_API_TOKEN", "HACER_DATABASE_URL", "HADB_PATH"} & seen.keys()


def test_a_relative_scripts_folder_works(scripts_dir, start_runner, runs, requester):  # noqa: F811
    start_runner(HACER_SCRIPTS_DIR=os.path.relpath(scripts_dir, PROJECT_DIR))  # runner's cwd: the project
    run_id = f"rel-{uuid.uuid4().hex[:6]}"
    requester("echo", ("relative",), run_id=run_id)
    assert runs.wait_finished(run_id).state == runstates.SUCCEEDED
    assert ("output", "['relative']") in runs.log_of(run_id)


def test_the_database_and_state_folders_are_private(spawn, hacer_env, tmp_path, watch, topics):
    state = tmp_path / "private" / "state"
    env = {**hacer_env, "HACER_STATE_DIR": str(state), "HADB_PATH": str(tmp_path / "private" / "db" / "hacer.db")}
    watcher = watch(topics.filter("recorder_state"))
    spawn(["recorder"], env)
    watcher.wait_for(lambda m: b'"online"' in m.payload, timeout=20)
    bridge_state = watch(topics.build("bridge_state"))
    bridge = spawn(["bridge"], env)
    bridge_state.wait_for(lambda m: m.payload == b"online", timeout=15)
    bridge.stop()  # writes its checkpoint into the state folder
    database = tmp_path / "private" / "db" / "hacer.db"
    assert (database.stat().st_mode & 0o777) == 0o600
    for path in (database.parent, tmp_path / "private", state):
        assert (path.stat().st_mode & 0o777) == 0o700, path
    assert all((f.stat().st_mode & 0o077) == 0 for f in database.parent.iterdir())


DAEMON = (  # a daemon made by fork alone (no exec): session of its own, stdio closed, pid to a file
    "import os, sys, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    null = os.open(os.devnull, os.O_RDWR)\n"
    "    for fd in (0, 1, 2):\n"
    "        os.dup2(null, fd)\n"
    "    open(sys.argv[1] + '.new', 'w').write(str(os.getpid()))\n"
    "    os.rename(sys.argv[1] + '.new', sys.argv[1])\n"
    "    time.sleep(300)\n"
    "    os._exit(0)\n"
    "while not os.path.exists(sys.argv[1]):  # the daemon has left the group: the run may end\n"
    "    time.sleep(0.01)\n"
    "print('daemonized', flush=True)\n"
)


@pytest.mark.parametrize("fork_server", ["1", "0"])
def test_a_daemon_forked_without_exec_ends_with_the_run(
    scripts_dir,
    start_runner,
    runs,  # noqa: F811
    requester,
    tmp_path,
    fork_server,
):
    """Neither the process group nor the pipe finds it: the launch token in its environment block does."""
    (scripts_dir / "daemon.py").write_text(DAEMON)
    start_runner(HACER_RUNNER_FORK_SERVER=fork_server)
    pid_file = tmp_path / "daemon-pid"
    run_id = f"daemon-{uuid.uuid4().hex[:6]}"
    requester("daemon", (str(pid_file),), run_id=run_id)
    assert runs.wait_finished(run_id).state == runstates.SUCCEEDED
    pid = int(pid_file.read_text())
    wait_until(lambda: not alive(pid), 5, "the daemon to be ended with its run")


def test_a_request_under_a_fires_run_id_runs_only_as_the_scheduler_stored_it(
    spawn,
    runner_env,
    start_runner,
    runs,  # noqa: F811
    make_bus,
    watch,
):
    """Fire run ids are predictable (and their next due times published): a user who sends them first
    runs nothing, and each fire runs the automation's parameters."""
    from datetime import UTC, datetime, timedelta

    from hacer.automations import AutomationSpec, Every, anchor, fire_run_id
    from hacer.messages import RunRequest
    from hacer.models import Automation, Database, RunClaim

    database = Database(f"sqlite:///{runner_env['HADB_PATH']}")
    database.init()
    changed_at = datetime.now(UTC)
    spec = AutomationSpec("every two seconds", Every(2), "test", ("from the automation",))
    with database.session() as session:
        row = Automation(name=spec.name, definition=spec.to_json().decode(), changed_at=changed_at.replace(tzinfo=None))
        session.add(row)
        session.commit()
        automation_id = row.id
    dues = [anchor(changed_at) + timedelta(seconds=2 * step) for step in range(1, 6)]
    forged_ids = [fire_run_id(automation_id, due) for due in dues]
    runner = start_runner()
    attacker = make_bus()
    for run_id in forged_ids:
        attacker.publish("hacer/runs/request", RunRequest("test", ("attacker",), run_id).to_payload(), qos=1)
    wait_until(lambda: runner.output().count("no automation fired it") == len(forged_ids), 20, "the forgeries dropped")
    with database.session() as session:
        assert session.query(RunClaim).count() == 0  # dropped unclaimed: the fires to come keep their ids
    fired = watch(f"hacer/automations/{automation_id}/fired")
    spawn(["scheduler"], runner_env)
    wait_until(lambda: len(fired.messages) >= 2, 30, "two fires")
    for message in fired.messages[:2]:
        run_id = json.loads(message.payload)["run_id"]
        assert runs.wait_finished(run_id).state == runstates.SUCCEEDED
        outputs = [data for kind, data in runs.log_of(run_id) if kind == "output"]
        assert outputs == ["test script running with ['from the automation']"], outputs
