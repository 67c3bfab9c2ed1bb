"""Checked decoding against bare `json.loads` on the same payloads, in the same process.

    .venv/bin/python bench/bench_decode.py

For the beacon (the bridge's hot path) and the log entry and status (the recorder's): payloads
per second through the project's decoder, which checks every type, range and length, against
`json.loads`, which checks nothing. A ratio above 1 means checking costs less than parsing did.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hacer.messages import LogEntry, RunStatus, bus_time  # noqa: E402
from hacer.nodewire import Beacon, decode_beacon  # noqa: E402


def rate(decode: Callable[[bytes], Any], payloads: list[bytes], rounds: int = 5) -> float:
    """The best of `rounds` passes over `payloads`, in payloads per second."""
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for payload in payloads:
            decode(payload)
        best = max(best, len(payloads) / (time.perf_counter() - started))
    return best


def main() -> None:
    now = bus_time(time.time())
    cases = {
        "2015 beacon": [Beacon(i, "toggle").to_payload() for i in range(50_000)],
        "newer beacon": [
            Beacon(i, "thermostat", name=f"n{i}", interval=60.0, port=8000, state={"temperature": 21}).to_payload()
            for i in range(50_000)
        ],
        "log entry": [
            LogEntry("a1b2c3", i + 1, now, "output", f"line {i} of output").to_payload() for i in range(50_000)
        ],
        "run status": [
            RunStatus(f"r{i}", "toggle", ("lamp", "on"), "succeeded", "runner-a", 0, now, now, now).to_payload()
            for i in range(20_000)
        ],
    }
    decoders: dict[str, Callable[[bytes], Any]] = {
        "2015 beacon": decode_beacon,
        "newer beacon": decode_beacon,
        "log entry": LogEntry.from_payload,
        "run status": RunStatus.from_payload,
    }
    print(f"{'payload':14} {'json.loads':>12} {'hacer, checked':>15}   ratio")
    for name, payloads in cases.items():
        bare = rate(json.loads, payloads)
        checked = rate(decoders[name], payloads)
        print(f"{name:14} {bare:10,.0f}/s {checked:13,.0f}/s   {checked / bare:5.2f}")


if __name__ == "__main__":
    main()
