"""hacer's command line: `python manage.py <command>` (as in 2015: `python manage.py runserver`)."""

from __future__ import annotations

import argparse
import code
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

from hacer.lifecycle import name_process
from hacer.logs import setup_logging
from hacer.parentdeath import child_env, die_with_parent_from_env
from hacer.settings import PROJECT_DIR, Settings, SettingsError, pin_paths, without_password

log = logging.getLogger("hacer.manage")

# The parts runserver starts: all in one process by default (`parts`), the api on threads (api/threaded.py),
# as eventlet would patch the standard library of the whole process; or each as its own (`--split`).
PARTS = ("bridge", "runner", "recorder", "scheduler", "api")
OWN_BROKER_PORT = 1884  # runserver's own broker when another holds the default port and none is configured


def cmd_bridge(args: argparse.Namespace) -> None:
    from bridge.main import main

    main()


def cmd_runner(args: argparse.Namespace) -> None:
    from runner.main import main

    main()


def cmd_api(args: argparse.Namespace) -> None:
    # A fresh interpreter, so eventlet patches the standard library before anything imports it.
    os.execv(sys.executable, [sys.executable, "-m", "api", *args.extra])


def cmd_recorder(args: argparse.Namespace) -> None:
    from recorder.main import main

    main()


def cmd_scheduler(args: argparse.Namespace) -> None:
    from scheduler.main import main

    main()


def cmd_parts(args: argparse.Namespace) -> None:
    run_parts(args.settings, list(dict.fromkeys(args.names)))


def cmd_automation(args: argparse.Namespace) -> None:
    import json
    from datetime import UTC, datetime

    from sqlalchemy import select

    from hacer import automations
    from hacer.messages import MessageError, decode
    from hacer.models import Automation, Database
    from hacer.scriptdir import ScriptDir

    settings: Settings = args.settings
    database = Database(settings.database_url)
    database.init()
    location = automations.location_of(settings.latitude, settings.longitude)
    now = datetime.now(UTC)
    with database.session() as session:
        if args.action == "add":
            definition = sys.stdin.read() if args.definition == "-" else args.definition
            try:
                spec = automations.AutomationSpec.from_json(definition, location)
                refusal = automations.missing_references(session, spec, ScriptDir(settings.scripts_dir))
                if refusal:
                    raise MessageError(refusal)
                row = automations.save(session, spec, now)
            except (MessageError, automations.NameTaken) as exc:
                raise SystemExit(f"automation not added: {exc}") from None
            session.commit()
            print(f"{row.id}\t{row.name}")
            return
        if args.action == "list":
            for row in session.scalars(select(Automation).order_by(Automation.id)):
                view = automations.describe(session, row, location, now, count=1)
                state = "on " if row.enabled else "off"
                print(f"{row.id}\t{state}\t{row.name}\tnext {(view['next_fires'] or ['-'])[0]}")
            return
        found = automations.find(session, args.key)
        if found is None:
            raise SystemExit(f"no automation {args.key!r}")
        if args.action == "rm":
            session.delete(found)
            session.commit()
            return
        start = None
        if args.start is not None:
            try:
                spec = decode(automations.AutomationSpec, found.definition, "automation")
                start = automations.start_time(args.start, spec)
            except MessageError as exc:
                raise SystemExit(str(exc)) from None
        view = automations.describe(session, found, location, now, count=args.count, start=start)
        print(json.dumps(view, indent=2))


def cmd_run(args: argparse.Namespace) -> None:
    import uuid

    from hacer.bus import Bus
    from hacer.topics import Topics
    from runner.request import request_run

    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)  # the run's log is the output here
    settings: Settings = args.settings
    bus = Bus(settings.mqtt_url, Topics(settings.topic_prefix), client_id=f"hacer-cli-{uuid.uuid4().hex[:8]}")
    try:
        code = request_run(bus, args.script, args.params, follow=not args.detach)
    finally:
        bus.stop()
    sys.exit(code)


def cmd_initdb(args: argparse.Namespace) -> None:
    from hacer.models import Database

    settings: Settings = args.settings
    Database(settings.database_url).init()
    log.info("database ready: %s", settings.database_url.split("@")[-1])  # no password in logs


def cmd_purge(args: argparse.Namespace) -> None:
    from hacer.models import Database
    from recorder.retention import Purger, Retention, vacuum

    settings: Settings = args.settings
    database = Database(settings.database_url)
    database.init()
    print(f"purged {Purger(database.engine, Retention.from_settings(settings))()}")
    if args.vacuum:
        vacuum(database.engine)


def cmd_backup(args: argparse.Namespace) -> None:
    from pathlib import Path

    from hacer.models import Database
    from ops.backup import BackupError, backup, restore

    settings: Settings = args.settings
    database = Database(settings.database_url)
    try:
        if args.command == "backup":
            backup(database, Path(args.path))
        else:
            restore(database, Path(args.path))
    except BackupError as exc:
        raise SystemExit(f"{args.command}: {exc}") from None
    log.info("%s %s", "backed up to" if args.command == "backup" else "restored from", args.path)


def cmd_status(args: argparse.Namespace) -> None:
    import time

    from hacer.models import Database
    from hacer.topics import Topics
    from ops import status

    logging.getLogger().setLevel(logging.WARNING)  # the report is the output
    settings: Settings = args.settings
    expected = tuple(part.strip() for part in args.expect.split(",") if part.strip())
    unknown = set(expected) - set(status.PARTS)
    if unknown:
        raise SystemExit(f"status: --expect knows {', '.join(status.PARTS)}, not {', '.join(sorted(unknown))}")
    report = status.gather(
        settings.mqtt_url, Topics(settings.topic_prefix), Database(settings.database_url), time.time(), expected,
        args.timeout,
    )  # fmt: skip
    print(status.to_json(report) if args.json else status.render(report))
    sys.exit(status.exit_code(report))


def cmd_broker_users(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ops.brokerusers import USERS, BrokerUsersError, write_users

    try:
        made = write_users(Path(args.password_file), Path(args.env_dir), args.host, args.port, args.new_passwords)
    except BrokerUsersError as exc:
        raise SystemExit(f"broker-users: {exc}") from None
    print(f"wrote {args.password_file} ({len(USERS)} users; new passwords for: {', '.join(made) or 'none'})")
    print(f"wrote {', '.join(f'{args.env_dir}/{user}.env' for user in USERS)}")
    print("mosquitto reads the password file again on SIGHUP: systemctl reload mosquitto")


def cmd_shell(args: argparse.Namespace) -> None:
    from sqlalchemy import select

    from hacer import models

    settings: Settings = args.settings
    db = models.Database(settings.database_url).make_current()
    namespace = {
        "db": db,
        "settings": settings,
        "models": models,
        "select": select,
        "Node": models.Node,
        "NodeType": models.NodeType,
        "ScriptLogEntry": models.ScriptLogEntry,
        "ScriptLogEntryType": models.ScriptLogEntryType,
    }
    code.interact(
        banner=f"hacer shell: db ({settings.database_url}), models, {', '.join(sorted(namespace))}", local=namespace
    )


def cmd_schemas(args: argparse.Namespace) -> None:
    from ops.schemadoc import ASYNCAPI, SETTINGS_DOC, asyncapi_json, schemas_markdown, with_schemas, with_settings_table

    if args.write:
        doc = PROJECT_DIR / "docs" / "topics.md"
        doc.write_text(with_schemas(doc.read_text()))
        ASYNCAPI.write_text(asyncapi_json())
        SETTINGS_DOC.write_text(with_settings_table(SETTINGS_DOC.read_text()))
        log.info("renewed the payload schemas of %s and %s, and the table of %s", doc, ASYNCAPI, SETTINGS_DOC)
    else:
        print(schemas_markdown())


def cmd_emulate(args: argparse.Namespace) -> None:
    from emulator.main import main

    main(args.emulator_args)


def cmd_runserver(args: argparse.Namespace) -> None:
    from ops.broker import BrokerProcess, port_answers

    settings: Settings = args.settings
    # Schema upgrades in a process of their own: alembic (6 MB) never stays in a part that runs for months.
    if subprocess.run([sys.executable, str(PROJECT_DIR / "manage.py"), "initdb"], env=child_env()).returncode:
        raise SystemExit("runserver: the database could not be upgraded (see above)")
    from ops.supervisor import Part, Supervisor, exec_manage, preload

    url = urlsplit(settings.mqtt_url)
    host, port = url.hostname or "127.0.0.1", url.port or 1883
    if not os.environ.get("HACER_MQTT_URL", "").strip() and port_answers(host, port):
        # Not configured, and another broker holds the default port (often the system's own
        # mosquitto): its persistence, ACL and TCP settings are not the ones hacer's promises rest on.
        if port_answers(host, OWN_BROKER_PORT):
            raise SystemExit(
                f"runserver: brokers answer on {host}:{port} and {host}:{OWN_BROKER_PORT}, neither started by "
                "this runserver (another hacer?): stop it, or set HACER_MQTT_URL to the broker to use"
            )
        log.warning(
            "a broker that is not hacer's answers on %s:%d (the system's mosquitto?): hacer starts its own "
            "on %s:%d instead (watch it with `mosquitto_sub -p %d -v -t 'hacer/#'`); set HACER_MQTT_URL "
            "to use another broker",
            host,
            port,
            host,
            OWN_BROKER_PORT,
            OWN_BROKER_PORT,
        )
        port = OWN_BROKER_PORT
        os.environ["HACER_MQTT_URL"] = f"mqtt://{host}:{port}"  # for the parts runserver execs
        settings = replace(settings, mqtt_url=os.environ["HACER_MQTT_URL"])
    broker: list[Part] = []
    # A broker with users (hacer-server.service's) is the system's: when it is away, wait for it, never stand in.
    if (
        url.scheme == "mqtt"
        and not url.username
        and host in ("127.0.0.1", "localhost")
        and not port_answers(host, port)
    ):
        command, _ = BrokerProcess(settings.state_dir / "mosquitto", [port]).prepare()
        log.info("starting mosquitto on %s:%d, restarted like every part if it dies", host, port)
        broker.append(
            Part(
                "broker",
                lambda: os.execv(command[0], command),
                ready=lambda: port_answers(host, port, timeout=0.2),
                stops_last=True,
            )
        )
    else:
        log.info("using the broker at %s", without_password(settings.mqtt_url))

    def forked(name: str, run: Callable[[], None]) -> Part:
        def main() -> None:
            setup_logging(settings, name, args.verbose)
            run()

        return Part(name, main)

    if args.split:
        parts = [forked(name, partial(run_parts, settings, [name])) for name in PARTS if name != "api"]
        # Eventlet must patch the standard library before anything imports it: a fresh interpreter.
        parts.append(Part("api", exec_manage("api")))
    else:
        parts = [forked("parts", partial(run_parts, settings, list(PARTS)))]
    if args.emulate:
        # Beacon every 10 s (announced, so offline after 30 s): nodes show up at once.
        emulate = exec_manage(
            "emulate", "--count", str(args.emulate), "--interval", "10", "--announce-interval", "--drift"
        )
        parts.append(Part("emulate", emulate))
    if args.split:
        # The four non-web parts share these modules' pages; one child alone would not (bench/README.md, memory).
        preload()
    supervisor = Supervisor(broker + parts, prefixed=settings.log_format != "json")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, supervisor.stop)
    supervisor.run()


def run_parts(settings: Settings, names: list[str]) -> None:
    """Build the parts `names` (each <part>/main.py's build_<part>) and run them in this process until a signal."""
    import importlib

    from hacer.lifecycle import Together, run_until_signal

    modules = {"api": "api.threaded"}  # api/main.py is eventlet's
    parts = [
        getattr(importlib.import_module(modules.get(name, f"{name}.main")), f"build_{name}")(settings) for name in names
    ]
    log.info("starting %s", ", ".join(names))
    run_until_signal(Together(parts))


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the command."""
    parser = argparse.ArgumentParser(prog="manage.py", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    runserver = commands.add_parser("runserver", help="the whole server (and mosquitto when none answers)")
    runserver.add_argument("--emulate", type=int, default=0, metavar="N", help="also run N emulated nodes")
    runserver.add_argument(
        "--split",
        action="store_true",
        help="each part a process of its own, the api on eventlet (more memory; a part's crash restarts it alone)",
    )
    runserver.add_argument("--together", action="store_true", help=argparse.SUPPRESS)  # the default since 2026-12
    runserver.set_defaults(func=cmd_runserver)
    commands.add_parser("bridge", help="the bridge alone").set_defaults(func=cmd_bridge)
    commands.add_parser("runner", help="a runner alone (start several to share the work)").set_defaults(func=cmd_runner)
    commands.add_parser("api", help="the api (REST, websockets, control app)").set_defaults(func=cmd_api)
    commands.add_parser("recorder", help="the recorder alone (bus -> database)").set_defaults(func=cmd_recorder)
    commands.add_parser("scheduler", help="the scheduler alone (automations -> run requests)").set_defaults(
        func=cmd_scheduler
    )
    together = commands.add_parser("parts", help="several parts in one process: less memory, less isolation")
    together.add_argument("names", nargs="+", choices=PARTS, metavar="PART", help=", ".join(PARTS))
    together.set_defaults(func=cmd_parts)
    automation = commands.add_parser("automation", help="add, list, remove automations, or show when they fire")
    actions = automation.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add one from its JSON definition (see docs/automations.md)")
    add.add_argument("definition", help="the JSON, or - to read it from standard input")
    actions.add_parser("list", help="every automation, on or off, and its next fire")
    remove = actions.add_parser("rm", help="remove one (its runs stay)")
    remove.add_argument("key", help="id or name")
    upcoming = actions.add_parser("next", help="its definition, next fires and last runs")
    upcoming.add_argument("key", help="id or name")
    upcoming.add_argument("--count", type=int, default=5, help="how many next fires (5)")
    upcoming.add_argument(
        "--from", dest="start", metavar="TIME", help="list fires from this time (2027-03-27T00:00, the trigger's zone)"
    )
    automation.set_defaults(func=cmd_automation)
    run = commands.add_parser("run", help="request a run of a script and follow its log (exit code: the run's)")
    run.add_argument("--detach", action="store_true", help="print the run id and return at once")
    run.add_argument("script")
    run.add_argument("params", nargs=argparse.REMAINDER, help="the script's parameters, as they are")
    run.set_defaults(func=cmd_run)
    commands.add_parser(
        "initdb", help="create or upgrade the schema (migrations keep every row) and the fixed rows; idempotent"
    ).set_defaults(func=cmd_initdb)
    purge = commands.add_parser("purge", help="remove the history past HACER_KEEP_DAYS and HACER_KEEP_RUNS now")
    purge.add_argument("--vacuum", action="store_true", help="then compact a SQLite file (it is locked meanwhile)")
    purge.set_defaults(func=cmd_purge)
    status = commands.add_parser(
        "status", help="broker, parts, nodes, runs and recent errors; exit code 0 all up, 1 a problem, 2 unreachable"
    )
    status.add_argument("--json", action="store_true", help="the report as JSON")
    status.add_argument("--expect", default=",".join(PARTS), help="the parts that must be online (default: all)")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker (5)")
    status.set_defaults(func=cmd_status)
    users = commands.add_parser(
        "broker-users", help="the production broker's users: password file, and each part's broker URL file"
    )
    users.add_argument("--password-file", default="/etc/mosquitto/hacer.passwd", help="(%(default)s)")
    users.add_argument("--env-dir", default="/etc/hacer", help="where each role's <user>.env goes (%(default)s)")
    users.add_argument("--host", default="127.0.0.1", help="the broker's address in the URLs (%(default)s)")
    users.add_argument("--port", type=int, default=1883, help="(%(default)s)")
    users.add_argument("--new-passwords", action="store_true", help="make new passwords instead of keeping them")
    users.set_defaults(func=cmd_broker_users)
    for name, what in (
        ("backup", "write a backup of the database to PATH while everything runs (SQLite file or pg_dump)"),
        ("restore", "replace the database with the backup at PATH, then upgrade it (stop the parts first)"),
    ):
        command = commands.add_parser(name, help=what)
        command.add_argument("path", metavar="PATH")
        command.set_defaults(func=cmd_backup)
    commands.add_parser("shell", help="a Python shell with db and the models (2015 set-up works)").set_defaults(
        func=cmd_shell
    )
    schemas = commands.add_parser("schemas", help="the bus payloads' JSON schemas, derived from hacer/messages.py")
    schemas.add_argument(
        "--write",
        action="store_true",
        help="renew them in docs/topics.md and docs/asyncapi.json, and docs/settings.md's table",
    )
    schemas.set_defaults(func=cmd_schemas)
    commands.add_parser("emulate", help="emulated nodes (see `emulate -h`)", add_help=False).set_defaults(
        func=cmd_emulate
    )
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("emulate", "api"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.emulator_args = args.extra = rest
    die_with_parent_from_env()  # a part started by runserver ends with it
    pin_paths(os.environ)  # a relative path means the folder the user started in, to every part
    if getattr(args, "path", None):
        args.path = str(Path(args.path).resolve())  # backup and restore: likewise
    try:
        args.settings = Settings.from_env()
    except SettingsError as exc:
        raise SystemExit(f"manage.py: {exc}") from None
    setup_logging(args.settings, args.command, args.verbose)
    os.chdir(PROJECT_DIR)
    if args.command in (*PARTS, "emulate"):  # also when runserver execs it: named as the forked parts are
        name_process(f"hacer-{args.command}")
    args.func(args)


if __name__ == "__main__":
    main()
