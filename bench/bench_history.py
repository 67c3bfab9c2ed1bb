"""A year of one sensor read every 30 s, kept as the recorder keeps it: how fast its history answers.

    .venv/bin/python bench/bench_history.py                    # SQLite
    .venv/bin/python bench/bench_history.py --database-url postgresql://...

The year is written a day at a time (a sample every 30 s, the value wandering, as readings
would give it), each day rolled up as the recorder's purge does (raw samples for
HACER_HISTORY_RAW_DAYS' default of 7 days, then 5-minute buckets). Then each query the control
app makes is timed (median of 20) through `hacer.history.history`, as the REST endpoint calls it,
against the baseline of the same connection reading one sample by its primary key.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import insert, select  # noqa: E402

from hacer.history import DAY_MS, HistoryRetention, history, roll_up  # noqa: E402
from hacer.models import Database, NodeSample  # noqa: E402

START_MS = 1_767_225_600_000  # 2026-01-01
EVERY_MS = 30_000
NODE, KEY = 1234567, "temperature"


def fill(database: Database, days: int) -> None:
    retention = HistoryRetention()
    per_day = DAY_MS // EVERY_MS
    for day in range(days):
        rows = []
        for i in range(per_day):
            at = START_MS + day * DAY_MS + i * EVERY_MS
            value = round(20 + 4 * math.sin(at / 86_400_000 * 2 * math.pi) + 0.01 * (i % 17), 1)
            rows.append({"node_id": NODE, "key": KEY, "at_ms": at, "value": value, "text": None})
        with database.engine.begin() as connection:
            connection.execute(insert(NodeSample), rows)
        with database.engine.connect() as connection:
            roll_up(connection, retention, START_MS + (day + 1) * DAY_MS)


def timed(call, repeat: int = 20) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="default: a SQLite file in a temporary folder")
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        database = Database(args.database_url or f"sqlite:///{Path(folder) / 'history.db'}")
        database.init()
        started = time.perf_counter()
        fill(database, args.days)
        print(f"{args.days} days of a sample every 30 s written and rolled up in {time.perf_counter() - started:.0f} s")
        end = START_MS + args.days * DAY_MS
        with database.engine.connect() as connection:
            baseline = timed(
                lambda: connection.execute(
                    select(NodeSample.value).where(
                        NodeSample.node_id == NODE, NodeSample.key == KEY, NodeSample.at_ms == end - EVERY_MS
                    )
                ).all()
            )
            print(f"baseline (one sample by primary key): {baseline:.2f} ms")
            print(f"{'range':>6} {'step':>6} {'points':>7} {'ms':>8} {'x baseline':>10}")
            for label, span_days, step in (
                ("hour", 1 / 24, None),
                ("day", 1, None),
                ("week", 7, None),
                ("month", 30, None),
                ("year", args.days, None),
                ("year", args.days, 86400),
            ):
                since = end - int(span_days * DAY_MS)
                answer = history(connection, NODE, KEY, since, end, step)
                took = timed(lambda s=since, st=step: history(connection, NODE, KEY, s, end, st))
                print(
                    f"{label:>6} {answer['step']:>6} {len(answer['points']):>7} {took:>8.1f} {took / baseline:>10.0f}"
                )
        database.engine.dispose()


if __name__ == "__main__":
    main()
