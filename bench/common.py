"""What the benchmarks share: free ports, percentiles, waiting for a condition."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

_HANDED_OUT: set[int] = set()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free on 127.0.0.1 right now and not returned before by this process (the tests' too).

    The kernel may give the same free port twice in a row: a broker then got one port for both
    of its listeners, and nginx one for http and https.
    """
    while True:
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


SERVER_CORE, HARNESS_CORE = 0, 1  # --one-core: a Raspberry Pi's budget for the server, the harness beside it


def one_core_prefix(one_core: bool) -> list[str]:
    """A command prefix that pins a process and all it starts to SERVER_CORE (or nothing)."""
    return ["taskset", "-c", str(SERVER_CORE)] if one_core else []


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `predicate` until true; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def broker_saving_on_every_change(folder: Path) -> Path:
    """A copy of mosquitto/dev.conf that saves its store on every change instead of every 5 minutes.

    The project's configs save every 5 minutes (hacer's own acknowledgements are the safety net);
    benchmarks run both to show what saving on every change would cost.
    """
    template = Path(__file__).resolve().parent.parent / "mosquitto" / "dev.conf"
    config = folder / "dev-autosave-on-changes.conf"
    text = template.read_text().replace("autosave_on_changes false", "autosave_on_changes true")
    config.write_text(text.replace("autosave_interval 300", "autosave_interval 1"))  # after each change
    return config
