"""Settings: every environment variable hacer reads is read here, once."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

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


def _discovery_prefix(env: Mapping[str, str], name: str) -> str:
    raw = env.get(name, "").strip().strip("/") or "homeassistant"
    if raw.lower() == "off":
        return ""
    if any(c in raw for c in "+#\0"):
        raise SettingsError(f"{name}={raw!r} must be a topic without wildcards, or off")
    return raw


def _deadbands(env: Mapping[str, str], name: str) -> dict[str, float]:
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


@dataclass(frozen=True)
class Settings:
    """The configuration of one hacer process."""

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = "hacer"
    database_url: str = field(default_factory=lambda: sqlite_url(PROJECT_DIR / "hacer.db"))
    discovery_host: str = "0.0.0.0"
    discovery_port: int = 7775
    node_port: int = 7777
    # None: three times the interval the node announces (60 s when it does not say).
    offline_after: float | None = None
    node_timeout: float = 3.0
    # A flood of made-up node ids is refused past these (counted as node_limit, new_node_rate).
    max_nodes: int = 10_000
    new_nodes_per_second: float = 50.0
    stats_interval: float = 10.0
    lastseen_interval: float = 2.0
    # What the bridge reads of each node type and how often (bridge/poller.py).
    poll: dict[str, PollPlan] = field(default_factory=lambda: parse_poll_plans(DEFAULT_POLL))
    # Per key: a reading is announced when it moves more than this from the one announced.
    deadbands: dict[str, float] = field(default_factory=dict)
    # Home Assistant's MQTT discovery prefix the bridge publishes configs under; "": none.
    ha_discovery: str = "homeassistant"
    state_dir: Path = PROJECT_DIR / "var"
    scripts_dir: Path = PROJECT_DIR / "scripts"
    runner_id: str = field(default_factory=socket.gethostname)
    runner_capacity: int = 4
    # Runs are forked from a warm interpreter (runner/forkserver.py); off: each starts its own.
    runner_fork_server: bool = True
    run_timeout: float = 300.0
    cancel_grace: float = 5.0
    runner_takeover: float = 10.0
    http_host: str = "127.0.0.1"
    http_port: int = 5000
    # Connections the api holds at most (in all, from one address) and seconds one may send nothing.
    http_max_connections: int = 1000
    http_max_per_client: int = 100
    http_idle_timeout: float = 60.0
    api_token: str = ""
    # Names the api is reached by beyond localhost, IP literals and this machine's own names
    # ("*": any), and other origins whose pages may change things (DNS rebinding, CSRF).
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    recorder_id: str = field(default_factory=socket.gethostname)
    rescue_after: float = 5.0
    node_data_every: float = 60.0
    run_data_every: float = 1.0
    # History kept (recorder/retention.py): finished runs, their logs and claims, fires, dead letters.
    keep_days: float = 30.0
    keep_runs: int = 100_000
    purge_every: float = 3600.0
    # Node history: raw samples for days, then rolled up into buckets of history_step seconds.
    history_raw_days: float = 7.0
    history_keep_days: float = 730.0
    history_step: int = 300
    resend_after: float = 5.0
    database_timeout: float = 10.0
    runner_outbox_bytes: int = 64 * 1024 * 1024
    # How scripts reach the broker (their own role, `hacer-script`); "" means the runner's URL
    # without its credentials. Scripts never get the runner's password.
    script_mqtt_url: str = ""
    # Variables of the runner's environment scripts see besides SCRIPT_ENV_ALLOWED.
    script_env_names: tuple[str, ...] = ()
    scheduler_id: str = field(default_factory=socket.gethostname)
    max_automations: int = 1000
    # Logging (hacer/logs.py): a level name, `text` or `json` lines, stderr or a rotated file per part.
    log_level: str = "INFO"
    log_format: str = "text"
    log_dir: Path | None = None
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 5
    # Where sun triggers are computed for (degrees; north and east positive); none: refused.
    latitude: float | None = None
    longitude: float | None = None

    @property
    def served_http_host(self) -> str:
        """Where the api listens: HACER_HTTP_HOST, but loopback only while no API token is set."""
        if not self.api_token and self.http_host not in ("127.0.0.1", "localhost", "::1"):
            return "127.0.0.1"
        return self.http_host

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read settings from the environment (or the given mapping)."""
        env = os.environ if env is None else env
        database_url = env.get("HACER_DATABASE_URL", "").strip()
        if not database_url:
            db_path = env.get("HADB_PATH", "").strip()
            database_url = sqlite_url(Path(db_path) if db_path else PROJECT_DIR / "hacer.db")
        prefix = env.get("HACER_TOPIC_PREFIX", "hacer").strip().strip("/")
        if not prefix or any(c in prefix for c in "+#\0"):
            raise SettingsError(f"HACER_TOPIC_PREFIX={prefix!r} must be a non-empty topic without wildcards")
        return cls(
            mqtt_url=env.get("HACER_MQTT_URL", "").strip() or cls.mqtt_url,
            topic_prefix=prefix,
            database_url=database_url,
            discovery_host=env.get("HACER_DISCOVERY_HOST", "").strip() or cls.discovery_host,
            discovery_port=_int(env, "HACER_DISCOVERY_PORT", 7775, 1, 65535),
            node_port=_int(env, "HACER_NODE_PORT", 7777, 1, 65535),
            offline_after=_float(env, "HACER_OFFLINE_AFTER", None, 0.1),
            node_timeout=_float(env, "HACER_NODE_TIMEOUT", 3.0, 0.05) or 3.0,
            max_nodes=_int(env, "HACER_MAX_NODES", 10_000, 1, 10_000_000),
            new_nodes_per_second=_float(env, "HACER_NEW_NODES_PER_SECOND", 50.0, 1.0) or 50.0,
            stats_interval=_float(env, "HACER_STATS_INTERVAL", 10.0, 0.1) or 10.0,
            lastseen_interval=_float(env, "HACER_LASTSEEN_INTERVAL", 2.0, 0.1) or 2.0,
            poll=parse_poll_plans(env.get("HACER_POLL", "").strip() or DEFAULT_POLL),
            deadbands=_deadbands(env, "HACER_DEADBAND"),
            ha_discovery=_discovery_prefix(env, "HACER_HA_DISCOVERY"),
            # Resolved now: a relative folder would otherwise be read from each script's own folder.
            state_dir=Path(env.get("HACER_STATE_DIR", "").strip() or PROJECT_DIR / "var").resolve(),
            scripts_dir=Path(env.get("HACER_SCRIPTS_DIR", "").strip() or PROJECT_DIR / "scripts").resolve(),
            runner_id=env.get("HACER_RUNNER_ID", "").strip() or socket.gethostname(),
            runner_capacity=_int(env, "HACER_RUNNER_CAPACITY", 4, 1, 256),
            runner_fork_server=_int(env, "HACER_RUNNER_FORK_SERVER", 1, 0, 1) == 1,
            run_timeout=_float(env, "HACER_RUN_TIMEOUT", 300.0, 0.1) or 300.0,
            cancel_grace=_float(env, "HACER_CANCEL_GRACE", 5.0, 0.0) or 0.0,
            runner_takeover=_float(env, "HACER_RUNNER_TAKEOVER", 10.0, 0.1) or 10.0,
            http_host=env.get("HACER_HTTP_HOST", "").strip() or "127.0.0.1",
            http_port=_int(env, "HACER_HTTP_PORT", 5000, 1, 65535),
            http_max_connections=_int(env, "HACER_HTTP_MAX_CONNECTIONS", 1000, 1, 1_000_000),
            http_max_per_client=_int(env, "HACER_HTTP_MAX_PER_CLIENT", 100, 1, 1_000_000),
            http_idle_timeout=_float(env, "HACER_HTTP_IDLE_TIMEOUT", 60.0, 1.0) or 60.0,
            api_token=env.get("HACER_API_TOKEN", "").strip(),
            script_mqtt_url=env.get("HACER_SCRIPT_MQTT_URL", "").strip(),
            script_env_names=_list(env, "HACER_SCRIPT_ENV"),
            allowed_hosts=_list(env, "HACER_ALLOWED_HOSTS"),
            allowed_origins=_list(env, "HACER_ALLOWED_ORIGINS"),
            recorder_id=env.get("HACER_RECORDER_ID", "").strip() or socket.gethostname(),
            rescue_after=_float(env, "HACER_RESCUE_AFTER", 5.0, 0.1) or 5.0,
            node_data_every=_float(env, "HACER_NODE_DATA_EVERY", 60.0, 0.0) or 0.0,
            run_data_every=_float(env, "HACER_RUN_DATA_EVERY", 1.0, 0.0) or 0.0,
            keep_days=_float(env, "HACER_KEEP_DAYS", 30.0, 0.001) or 30.0,
            keep_runs=_int(env, "HACER_KEEP_RUNS", 100_000, 0, 2**62),
            purge_every=_float(env, "HACER_PURGE_EVERY", 3600.0, 1.0) or 3600.0,
            history_raw_days=_float(env, "HACER_HISTORY_RAW_DAYS", 7.0, 0.0) or 0.0,
            history_keep_days=_float(env, "HACER_HISTORY_KEEP_DAYS", 730.0, 0.001) or 730.0,
            history_step=_int(env, "HACER_HISTORY_STEP", 300, 1, 86400),
            resend_after=_float(env, "HACER_RESEND_AFTER", 5.0, 0.1) or 5.0,
            database_timeout=_float(env, "HACER_DATABASE_TIMEOUT", 10.0, 0.01) or 10.0,
            runner_outbox_bytes=_int(env, "HACER_RUNNER_OUTBOX_BYTES", 64 * 1024 * 1024, 1 << 16, 1 << 40),
            scheduler_id=env.get("HACER_SCHEDULER_ID", "").strip() or socket.gethostname(),
            max_automations=_int(env, "HACER_MAX_AUTOMATIONS", 1000, 1, 1_000_000),
            log_level=_choice(env, "HACER_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
            log_format=_choice(env, "HACER_LOG_FORMAT", "text", ("text", "json")),
            log_dir=Path(env["HACER_LOG_DIR"].strip()).resolve() if env.get("HACER_LOG_DIR", "").strip() else None,
            log_max_bytes=_int(env, "HACER_LOG_MAX_BYTES", 10 * 1024 * 1024, 1024, 2**40),
            log_backups=_int(env, "HACER_LOG_BACKUPS", 5, 0, 1000),
            latitude=_degrees(env, "HACER_LATITUDE", 90.0),
            longitude=_degrees(env, "HACER_LONGITUDE", 180.0),
        )


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
