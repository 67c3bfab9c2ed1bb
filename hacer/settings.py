"""Settings: every environment variable hacer reads is read here, once."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent


class SettingsError(ValueError):
    """A setting has a value hacer cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} is outside {low}..{high}")
    return value


def _float(env: Mapping[str, str], name: str, default: float | None, low: float) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise SettingsError(f"{name}={raw!r} is not a finite number")
    if value < low:
        raise SettingsError(f"{name}={value} is below {low}")
    return value


def _degrees(env: Mapping[str, str], name: str, bound: float) -> float | None:
    value = _float(env, name, None, -bound)
    if value is not None and value > bound:
        raise SettingsError(f"{name}={value} is above {bound}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip() or default
    for choice in choices:
        if raw.lower() == choice.lower():
            return choice
    raise SettingsError(f"{name}={raw!r} is not one of {', '.join(choices)}")


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


DEFAULT_POLL = "thermostat:temperature,target@30 sensor_temp:temperature@30 toggle:on@60 light_rgb:color@60"


@dataclass(frozen=True)
class PollPlan:
    """Which keys of one node type the bridge reads, and how often."""

    keys: tuple[str, ...]
    interval: float


def parse_poll_plans(spec: str) -> dict[str, PollPlan]:
    """Parse HACER_POLL: `type:key,key@seconds ...`; `off` reads nothing."""
    if spec.strip().lower() == "off":
        return {}
    plans: dict[str, PollPlan] = {}
    for item in spec.replace(";", " ").split():
        node_type, _, rest = item.partition(":")
        keys, _, seconds = rest.partition("@")
        try:
            interval = float(seconds)
        except ValueError:
            interval = 0.0
        names = tuple(key for key in keys.split(",") if key)
        if not node_type or not names or not 1.0 <= interval < 1e9:
            raise SettingsError(f"HACER_POLL item {item!r} is not type:key,key@seconds (1 s at least)")
        plans[node_type] = PollPlan(names, interval)
    return plans


def _discovery_prefix(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip().strip("/") or default
    if raw.lower() == "off":
        return ""
    if any(c in raw for c in "+#\0"):
        raise SettingsError(f"{name}={raw!r} must be a topic without wildcards, or off")
    return raw


def _deadbands(env: Mapping[str, str], name: str, default: dict[str, float]) -> dict[str, float]:
    deadbands = {}
    for item in _list(env, name):
        key, _, raw = item.partition("=")
        try:
            deadbands[key.strip()] = float(raw)
        except ValueError:
            raise SettingsError(f"{name} item {item!r} is not key=number") from None
        if not key.strip() or not 0 <= deadbands[key.strip()] < math.inf:
            raise SettingsError(f"{name} item {item!r} is not key=number (0 or more)")
    return deadbands


Reader = Callable[[Mapping[str, str], str, Any], Any]  # (environment, variable, default) -> value


@dataclass(frozen=True)
class Setting:
    """How one environment variable becomes a setting, and what docs/settings.md says of it."""

    env: str
    read: Reader
    meaning: str
    shown: str | None = None  # the default as people read it, where it is not the value itself
    also: tuple[str, ...] = ()  # other variables it reads


def setting(
    env: str,
    default: Any,
    read: Reader,
    meaning: str,
    shown: str | None = None,
    also: tuple[str, ...] = (),
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A Settings field read from `env` by `read` (`factory` makes the default, if given)."""
    metadata = {"setting": Setting(env, read, meaning, shown, also)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def integer(low: int, high: int) -> Reader:
    return lambda env, name, default: _int(env, name, default, low, high)


def number(low: float) -> Reader:
    return lambda env, name, default: _float(env, name, default, low)


def degrees(bound: float) -> Reader:
    return lambda env, name, default: _degrees(env, name, bound)


def choice(*choices: str) -> Reader:
    return lambda env, name, default: _choice(env, name, default, choices)


def text(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(name, "").strip() or default


def names(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    return _list(env, name)


def switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    return _int(env, name, int(default), 0, 1) == 1


def folder(env: Mapping[str, str], name: str, default: Path | None) -> Path | None:
    # Resolved now: a relative folder would otherwise be read from each script's own folder.
    raw = env.get(name, "").strip()
    return Path(raw).resolve() if raw else default


def _prefix(env: Mapping[str, str], name: str, default: str) -> str:
    prefix = env.get(name, default).strip().strip("/")
    if not prefix or any(c in prefix for c in "+#\0"):
        raise SettingsError(f"{name}={prefix!r} must be a non-empty topic without wildcards")
    return prefix


def _database(env: Mapping[str, str], name: str, default: str) -> str:
    db_path = env.get("HADB_PATH", "").strip()
    return env.get(name, "").strip() or (sqlite_url(Path(db_path)) if db_path else default)


def _poll(env: Mapping[str, str], name: str, default: dict[str, PollPlan]) -> dict[str, PollPlan]:
    return parse_poll_plans(env.get(name, "").strip() or DEFAULT_POLL)


HOST_NAME = "the host name"
UNSET = "(unset)"


@dataclass(frozen=True)
class SharedSettings:
    """Every part: the broker, the database, logging."""

    mqtt_url: str = setting(
        "HACER_MQTT_URL",
        "mqtt://127.0.0.1:1883",
        text,
        "broker; `mqtt://user:password@host:port`, `mqtts://`, `ws://`, `wss://`",
    )
    topic_prefix: str = setting("HACER_TOPIC_PREFIX", "hacer", _prefix, "first level of every topic")
    database_url: str = setting(
        "HACER_DATABASE_URL",
        None,
        _database,
        "any SQLAlchemy URL (`postgresql://...`); else `HADB_PATH`, a SQLite file, as in 2015",
        shown="`hacer.db` in the project",
        also=("HADB_PATH",),
        factory=lambda: sqlite_url(PROJECT_DIR / "hacer.db"),
    )
    database_timeout: float = setting(
        "HACER_DATABASE_TIMEOUT",
        10.0,
        number(0.01),
        "seconds a SQLite call waits for a locked database before it fails (the api then answers 503)",
    )
    log_level: str = setting(
        "HACER_LOG_LEVEL",
        "INFO",
        choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        "`DEBUG`, `INFO`, `WARNING`, `ERROR` or `CRITICAL` (`-v` on the command line: `DEBUG`)",
    )
    log_format: str = setting(
        "HACER_LOG_FORMAT",
        "text",
        choice("text", "json"),
        "`json`: one JSON object a line (`time` in UTC, `level`, `part`, `logger`, `message`, `exception`), which"
        " runserver passes on unprefixed",
    )
    log_dir: Path | None = setting(
        "HACER_LOG_DIR",
        None,
        folder,
        "a folder where each process writes `<part>.log` (one file per process, so rotating is safe). Under"
        " systemd, leave it unset: journald keeps and rotates stderr",
        shown="(unset: stderr)",
    )
    log_max_bytes: int = setting(
        "HACER_LOG_MAX_BYTES", 10 * 1024 * 1024, integer(1024, 2**40), "a log file's size when it is rotated"
    )
    log_backups: int = setting("HACER_LOG_BACKUPS", 5, integer(0, 1000), "rotated log files kept")


@dataclass(frozen=True)
class BridgeSettings:
    """The bridge: beacons, nodes, what it reads of them."""

    discovery_host: str = setting(
        "HACER_DISCOVERY_HOST", "0.0.0.0", text, "address the bridge listens on (broadcasts need 0.0.0.0)"
    )
    discovery_port: int = setting("HACER_DISCOVERY_PORT", 7775, integer(1, 65535), "UDP port of node beacons")
    node_port: int = setting(
        "HACER_NODE_PORT",
        7777,
        integer(1, 65535),
        "TCP port of the nodes (a beacon's `port` field overrides it per node)",
    )
    offline_after: float | None = setting(
        "HACER_OFFLINE_AFTER",
        None,
        number(0.1),
        "seconds without a beacon before a node is offline; unset: 3 × the interval the node announces, 180 s for"
        " 2015 nodes (60 s interval)",
        shown="three beacon intervals",
    )
    node_timeout: float = setting(
        "HACER_NODE_TIMEOUT",
        3.0,
        number(0.05),
        "seconds a node has to answer a command (the whole exchange; a reply is at most 4 KiB)",
    )
    poll: dict[str, PollPlan] = setting(
        "HACER_POLL",
        None,
        _poll,
        "what the bridge reads of each node type, and every how many seconds (`type:key,key@seconds`,"
        " space-separated; `off`: nothing); see docs/topics.md `state` (bridge/poller.py)",
        shown=f"`{DEFAULT_POLL}`",
        factory=lambda: parse_poll_plans(DEFAULT_POLL),
    )
    ha_discovery: str = setting(
        "HACER_HA_DISCOVERY",
        "homeassistant",
        _discovery_prefix,
        "Home Assistant's MQTT discovery prefix the bridge publishes every node's configs under (docs/topics.md);"
        " `off`: none",
    )
    deadbands: dict[str, float] = setting(
        "HACER_DEADBAND",
        None,
        _deadbands,
        "comma-separated `key=amount`: a value is announced only when it moves more than that from the one"
        " announced (noisy sensors)",
        shown=UNSET,
        factory=dict,
    )
    max_nodes: int = setting(
        "HACER_MAX_NODES",
        10_000,
        integer(1, 10_000_000),
        "nodes the bridge keeps at most; beacons past it are counted (`node_limit`) and taken later",
    )
    new_nodes_per_second: float = setting(
        "HACER_NEW_NODES_PER_SECOND",
        50.0,
        number(1.0),
        "new nodes the bridge takes a second; beacons past it are counted (`new_node_rate`) and taken later",
    )
    state_dir: Path = setting(
        "HACER_STATE_DIR",
        PROJECT_DIR / "var",
        folder,
        "the bridge's last-seen checkpoint, runserver's broker files",
        shown="`var/` in the project",
    )
    stats_interval: float = setting("HACER_STATS_INTERVAL", 10.0, number(0.1), "seconds between stats messages")
    lastseen_interval: float = setting(
        "HACER_LASTSEEN_INTERVAL", 2.0, number(0.1), "seconds between last-seen messages"
    )


@dataclass(frozen=True)
class RunnerSettings:
    """Runners and the scripts they run."""

    scripts_dir: Path = setting(
        "HACER_SCRIPTS_DIR",
        PROJECT_DIR / "scripts",
        folder,
        "the automation scripts (a relative path is taken from the current folder)",
        shown="`scripts/` in the project",
    )
    # Scripts never get the runner's password.
    script_mqtt_url: str = setting(
        "HACER_SCRIPT_MQTT_URL",
        "",
        text,
        "how scripts reach the broker: give them the `hacer-script` user",
        shown="the runner's URL without its credentials",
    )
    script_env_names: tuple[str, ...] = setting(
        "HACER_SCRIPT_ENV",
        (),
        names,
        "comma-separated names of more variables scripts may see (they get `PATH`, `HOME`, `LANG`, `LC_*`, `TZ`"
        " and hacer's own)",
    )
    runner_id: str = setting(
        "HACER_RUNNER_ID",
        None,
        text,
        "a runner's stable identity (its broker session keeps its share of requests while it restarts); give each"
        " runner on one host its own",
        shown=HOST_NAME,
        factory=socket.gethostname,
    )
    runner_capacity: int = setting(
        "HACER_RUNNER_CAPACITY", 4, integer(1, 256), "runs at once per runner; more wait in order"
    )
    runner_fork_server: bool = setting(
        "HACER_RUNNER_FORK_SERVER",
        True,
        switch,
        "`0`: every run starts its own interpreter instead of being forked from the runner's fork server (slower"
        " start, 20 MB less at rest)",
        shown="`1`",
    )
    run_timeout: float = setting(
        "HACER_RUN_TIMEOUT", 300.0, number(0.1), "default time limit of a run, seconds (a request may set its own)"
    )
    cancel_grace: float = setting(
        "HACER_CANCEL_GRACE",
        5.0,
        number(0.0),
        "seconds between SIGTERM and SIGKILL when a run is cancelled or times out",
    )
    runner_takeover: float = setting(
        "HACER_RUNNER_TAKEOVER",
        10.0,
        number(0.1),
        "seconds another runner's heartbeat in the database must stand still before its runs are reported lost and"
        " its queue taken over",
    )
    resend_after: float = setting(
        "HACER_RESEND_AFTER",
        5.0,
        number(0.1),
        "seconds a runner waits for a recorder to confirm a status or log entry before sending it again",
    )
    let_go_after: float = setting(
        "HACER_RUNNER_LET_GO_AFTER",
        300.0,
        number(0.0),
        "seconds a runner keeps what recorders confirmed before deleting it in a commit of its own, when no"
        " later write of its (a run's output or end) has taken it along (an SD card's wear); until then a"
        " finished run is not purged",
    )
    runner_outbox_bytes: int = setting(
        "HACER_RUNNER_OUTBOX_BYTES",
        64 * 1024 * 1024,
        integer(1 << 16, 1 << 40),
        "what one runner keeps unconfirmed in `run_outbox` at most (64 MiB); past it the oldest log entries are"
        " let go, counted",
    )


@dataclass(frozen=True)
class ApiSettings:
    """The api: where it listens, who may reach it."""

    http_host: str = setting(
        "HACER_HTTP_HOST",
        "127.0.0.1",
        text,
        "where the api listens; without a token it keeps to 127.0.0.1 and says so",
    )
    http_port: int = setting("HACER_HTTP_PORT", 5000, integer(1, 65535), "the api's port")
    http_max_connections: int = setting(
        "HACER_HTTP_MAX_CONNECTIONS",
        1000,
        integer(1, 1_000_000),
        "connections the api holds at most, in all (fewer when the process's descriptor limit asks it: 256 stay"
        " for the parts); past it a connection is closed at once",
    )
    http_max_per_client: int = setting(
        "HACER_HTTP_MAX_PER_CLIENT",
        100,
        integer(1, 1_000_000),
        "connections the api holds at most from one address (behind nginx, every connection is nginx's: raise it"
        " to the total)",
    )
    http_idle_timeout: float = setting(
        "HACER_HTTP_IDLE_TIMEOUT",
        60.0,
        number(1.0),
        "seconds a connection may send nothing before the api closes it",
    )
    api_token: str = setting(
        "HACER_API_TOKEN",
        "",
        text,
        "when set, REST needs `Authorization: Bearer <token>` and websockets `auth: {token}`",
    )
    # DNS rebinding and CSRF: the names the api answers to, the other pages that may change things.
    allowed_hosts: tuple[str, ...] = setting(
        "HACER_ALLOWED_HOSTS",
        (),
        names,
        "comma-separated names the api is reached by, beyond `localhost`, IP addresses and this machine's own"
        " names (`*`: any); other `Host` headers get 400 (DNS rebinding)",
    )
    allowed_origins: tuple[str, ...] = setting(
        "HACER_ALLOWED_ORIGINS",
        (),
        names,
        "comma-separated origins (`https://home.example`) whose pages may change things besides the api's own;"
        " other origins get 403 on every POST, DELETE and websocket connect",
    )
    max_automations: int = setting(
        "HACER_MAX_AUTOMATIONS",
        1000,
        integer(1, 1_000_000),
        "automations the api lets a user create at most (409 past it)",
    )

    @property
    def served_http_host(self) -> str:
        """Where the api listens: HACER_HTTP_HOST, but loopback only while no API token is set."""
        if not self.api_token and self.http_host not in ("127.0.0.1", "localhost", "::1"):
            return "127.0.0.1"
        return self.http_host


@dataclass(frozen=True)
class RecorderSettings:
    """Recorders: when they write, what history they keep."""

    recorder_id: str = setting(
        "HACER_RECORDER_ID",
        None,
        text,
        "a recorder's stable identity (its durable session)",
        shown=HOST_NAME,
        factory=socket.gethostname,
    )
    node_data_every: float = setting(
        "HACER_NODE_DATA_EVERY",
        60.0,
        number(0.0),
        "seconds the recorder lets node readings and last-seen times that come alone wait, unacknowledged, to"
        " write them in one transaction (an SD card's wear); a run's message has them written with it; `0`: each"
        " batch at once",
    )
    run_data_every: float = setting(
        "HACER_RUN_DATA_EVERY",
        1.0,
        number(0.0),
        "seconds the recorder lets a run's request, statuses and log entries wait, unacknowledged, so a run is two"
        " transactions (its first status at once, then the rest); REST reads of runs and logs lag the bus by as"
        " much; `0`: each batch at once",
    )
    rescue_after: float = setting(
        "HACER_RESCUE_AFTER",
        5.0,
        number(0.1),
        "seconds after which a run request no runner took is sent again (while a runner is online)",
    )
    # History kept (recorder/retention.py).
    keep_days: float = setting(
        "HACER_KEEP_DAYS",
        30.0,
        number(0.001),
        "days finished runs (with their log entries and claims), 2015 log entries, automation fires and dead"
        " letters are kept (the recorder purges them; see docs/architecture.md, How the recorder works)",
    )
    keep_runs: int = setting(
        "HACER_KEEP_RUNS",
        100_000,
        integer(0, 2**62),
        "finished runs kept at most, the newest; `0`: no limit but the days",
    )
    purge_every: float = setting("HACER_PURGE_EVERY", 3600.0, number(1.0), "seconds between the recorder's purges")
    history_raw_days: float = setting(
        "HACER_HISTORY_RAW_DAYS",
        7.0,
        number(0.0),
        "node history: days every value change is kept (availability changes too)",
    )
    history_step: int = setting(
        "HACER_HISTORY_STEP",
        300,
        integer(1, 86400),
        "node history: seconds of the buckets (low, mean, high, count) older changes are rolled up into",
    )
    history_keep_days: float = setting(
        "HACER_HISTORY_KEEP_DAYS", 730.0, number(0.001), "node history: days the buckets are kept"
    )


@dataclass(frozen=True)
class SchedulerSettings:
    """Schedulers: automations."""

    scheduler_id: str = setting(
        "HACER_SCHEDULER_ID",
        None,
        text,
        "a scheduler's name, in the fires it made",
        shown=HOST_NAME,
        factory=socket.gethostname,
    )
    # Where sun triggers are computed for; none: refused.
    latitude: float | None = setting(
        "HACER_LATITUDE", None, degrees(90.0), "degrees, north positive, sun triggers are computed for"
    )
    longitude: float | None = setting(
        "HACER_LONGITUDE",
        None,
        degrees(180.0),
        "degrees, east positive, sun triggers are computed for; without both, a sun trigger is refused",
    )
    step_resend_after: float = setting(
        "HACER_STEP_RESEND_AFTER",
        10.0,
        number(0.1),
        "seconds an automation's `set` step waits for the node's results before it is sent again",
    )


# Fields in this order: the shared ones first (a dataclass takes its bases' fields from the last).
GROUPS = (SharedSettings, BridgeSettings, RunnerSettings, ApiSettings, RecorderSettings, SchedulerSettings)


@dataclass(frozen=True)
class Settings(SchedulerSettings, RecorderSettings, ApiSettings, RunnerSettings, BridgeSettings, SharedSettings):
    """The configuration of one hacer process: every group's fields, each declaring its variable, default, meaning."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read settings from the environment (or the given mapping)."""
        env = os.environ if env is None else env
        values = {}
        for declared in fields(cls):
            how: Setting = declared.metadata["setting"]
            default = declared.default if declared.default_factory is MISSING else declared.default_factory()
            values[declared.name] = how.read(env, how.env, default)
        return cls(**values)


def settings_table() -> str:
    """docs/settings.md's tables, one a group: every variable, its default and its meaning, from the declarations."""
    parts = []
    for group in GROUPS:
        rows = [f"### {(group.__doc__ or '').split(':')[0].rstrip('.')}", "", "| variable | default | meaning |"]
        rows.append("| --- | --- | --- |")
        for declared in fields(group):
            how: Setting = declared.metadata["setting"]
            variables = ", ".join(f"`{name}`" for name in (how.env, *how.also))
            rows.append(f"| {variables} | {how.shown or _shown(declared.default)} | {how.meaning} |")
        parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


def _shown(default: Any) -> str:
    if default is None or default == () or default == "":
        return UNSET
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return f"`{default}`"


PATH_SETTINGS = ("HADB_PATH", "HACER_SCRIPTS_DIR", "HACER_STATE_DIR", "HACER_LOG_DIR")


def pin_paths(env: MutableMapping[str, str]) -> None:
    """Make the relative paths of `env`'s settings absolute, against the current folder.

    Done once, where a command starts (before it moves to the project folder), so that every part it
    starts, and every later read of the settings, means the folder the user started in.
    """
    for name in PATH_SETTINGS:
        if env.get(name, "").strip():
            env[name] = str(Path(env[name].strip()).resolve())
    url = env.get("HACER_DATABASE_URL", "").strip()
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        path, mark, query = url[len("sqlite:///") :].partition("?")
        env["HACER_DATABASE_URL"] = sqlite_url(Path(path)) + mark + query


def sqlite_url(path: Path) -> str:
    """Return the SQLAlchemy URL of a SQLite file."""
    return f"sqlite:///{Path(path).resolve()}"


def private_dir(path: Path) -> Path:
    """Create a folder, and the parents it lacks, that only their owner may enter (existing ones are left)."""
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for folder in missing:
        folder.chmod(0o700)
    return path


def without_password(url: str) -> str:
    """The URL without its user and password, for logs and reports."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('@')[-1]}"
