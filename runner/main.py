"""`python manage.py runner`: read settings, wire the runner, run until a signal."""

from __future__ import annotations

import compileall
import logging
import os
import sys
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from hacer.bus import Bus
from hacer.lifecycle import run_until_signal
from hacer.messages import RunnerState
from hacer.models import Database
from hacer.scriptdir import ScriptDir
from hacer.settings import PROJECT_DIR, Settings
from hacer.topics import Topics
from runner.claims import ClaimStore
from runner.launcher import Launcher
from runner.outbox import Outbox
from runner.service import Runner, RunnerConfig

log = logging.getLogger(__name__)

# A runner's queued requests wait in its broker session while it is away (a restart, an
# upgrade): keep the session a week.
SESSION_EXPIRY = 7 * 24 * 3600
# Seconds a thread may keep the GIL while another waits for it (Python's default: 5 ms). A run's
# start and first line pass between the runner's threads (the bus's, the dispatcher, a worker);
# at 0.5 ms the first line's p99 came 1.4 ms sooner, and its p50 0.4 ms, in six alternating runs.
GIL_SWITCH_INTERVAL = 0.0005


def precompile_script_library() -> None:
    """Write the bytecode scripts import, even where PYTHONDONTWRITEBYTECODE is set.

    Every script process imports scripting (and 2015 ones hasapi): compiling them anew
    at each start cost 3 ms of each script's start (measured).
    """
    compileall.compile_dir(PROJECT_DIR / "hacer", quiet=1)
    compileall.compile_dir(PROJECT_DIR / "scripting", quiet=1)
    compileall.compile_file(PROJECT_DIR / "hasapi.py", quiet=1)


# What a script's process sees of the runner's environment: never its secrets (the api token,
# the database URL, the runner's broker password).
SCRIPT_ENV_ALLOWED = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TERM",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONIOENCODING",
    "PYTHONUTF8",
    "HACER_NODE_TIMEOUT",
)


def script_environment(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """Return the environment every script starts from (the runner adds the run's own)."""
    allowed = set(SCRIPT_ENV_ALLOWED) | set(settings.script_env_names)
    env = {k: v for k, v in environ.items() if k in allowed or k.startswith("LC_")}
    env.update(
        {
            "HACER_MQTT_URL": settings.script_mqtt_url or without_credentials(settings.mqtt_url),
            "HACER_TOPIC_PREFIX": settings.topic_prefix,
        }
    )
    return env


def without_credentials(url: str) -> str:
    """Return a broker URL without its user:password@."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    log.warning(
        "scripts connect to the broker without the runner's credentials: set "
        "HACER_SCRIPT_MQTT_URL with the hacer-script user (see mosquitto/acl)"
    )
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def build_runner(settings: Settings) -> Runner:
    """Build a runner (not started) from settings; the process's GIL switch interval is set for it."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    precompile_script_library()
    topics = Topics(settings.topic_prefix)
    # One SQLite connection for the runner's threads: they then wait their turn in the pool, where
    # SQLite would make them sleep and poll for its write lock (a burst of 200 runs drained in
    # 4.0 s with a connection each; see bench_runner.py).
    one_connection = {"pool_size": 1, "max_overflow": 0} if settings.database_url.startswith("sqlite") else {}
    database = Database(settings.database_url, settings.database_timeout, checkpoint_apart=True, **one_connection)
    database.init()
    offline = RunnerState(settings.runner_id, "offline").to_payload()
    # A stable client id: the broker parks this runner's share of requests in its session.
    bus = Bus(
        settings.mqtt_url,
        topics,
        client_id=f"hacer-runner-{settings.runner_id}",
        presence_topic=topics.build("runner_state", settings.runner_id),
        will=offline,
        clean_start=False,
        session_expiry=SESSION_EXPIRY,
        manual_ack=True,
        send_from_caller=True,
    )
    script_env = script_environment(settings, os.environ)
    config = RunnerConfig(
        runner_id=settings.runner_id,
        capacity=settings.runner_capacity,
        default_timeout=settings.run_timeout,
        cancel_grace=settings.cancel_grace,
        takeover_after=settings.runner_takeover,
        script_env=script_env,
    )
    outbox = Outbox(
        database.engine,
        settings.runner_id,
        resend_after=settings.resend_after,
        max_bytes=settings.runner_outbox_bytes,
        let_go_after=settings.let_go_after,
    )
    return Runner(
        bus,
        topics,
        ClaimStore(database.engine, settings.runner_id),
        ScriptDir(settings.scripts_dir),
        config,
        outbox,
        Launcher(config.python, script_env, fork_server=settings.runner_fork_server),
        checkpoint=database.checkpoint,
    )


def main(settings: Settings | None = None) -> None:
    """Run the runner until SIGINT or SIGTERM."""
    settings = settings or Settings.from_env()
    runner = build_runner(settings)
    log.info(
        "starting runner %s on %s with capacity %d", settings.runner_id, settings.scripts_dir, settings.runner_capacity
    )
    run_until_signal(runner)
