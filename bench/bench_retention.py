"""A year of a script every minute on SQLite, purged daily as the recorder does: what the file holds.

    .venv/bin/python bench/bench_retention.py             # 365 days, HACER_KEEP_DAYS' default (30)
    .venv/bin/python bench/bench_retention.py --quick     # 60 days

Each simulated minute an automation fires a run of `toggle` with four log entries (launch,
sent_set, result, exit_status), its claim and its fire row, written a day at a time; after each
day `recorder.retention.purge` runs as of that day's end. Printed: the file's size (database and
WAL, after a checkpoint) over the year against the size the same days would take unpurged, and
each day's purge time against the time writing that day's rows took (the baseline, same run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import insert  # noqa: E402

from hacer.models import AutomationFire, Database, Run, RunClaim, ScriptLogEntry, utc_datetime  # noqa: E402
from recorder.retention import DAY, Retention, purge  # noqa: E402

START = 1_767_225_600.0  # 2026-01-01
ENTRIES = ((1, ""), (3, '"on": "1"'), (5, '"on": "1"'), (7, "success"))  # (entry type id, data)


def write_day(database: Database, day: int, first_id: int) -> int:
    """Write one day of a run a minute; return the next run's id."""
    runs, entries, claims, fires = [], [], [], []
    for minute in range(1440):
        at = utc_datetime(START + day * DAY + minute * 60)
        run_id, thread_id = uuid.uuid4().hex[:12], first_id + minute
        request = json.dumps({"script": "toggle", "params": ["salon", "1"], "run_id": run_id, "requested_by": "auto"})
        runs.append(
            {
                "id": thread_id,
                "run_id": run_id,
                "script": "toggle",
                "params": '["salon", "1"]',
                "state": "succeeded",
                "runner": "pi",
                "exit_code": 0,
                "requested_by": "automation:1",
                "requested_at": at,
                "queued_at": at,
                "started_at": at,
                "finished_at": at,
                "request": request,
            }  # fmt: skip
        )
        entries += [
            {
                "seq": seq,
                "timestamp": at,
                "thread_id": thread_id,
                "script_name": "toggle",
                "params": '["1"]',
                "entry_type_id": kind,
                "data": data,
            }  # fmt: skip
            for seq, (kind, data) in enumerate(ENTRIES, start=1)
        ]
        claims.append(
            {
                "run_id": run_id,
                "runner_id": "pi",
                "state": "succeeded",
                "request": request,
                "claimed_at": at,
                "updated_at": at,
            }  # fmt: skip
        )
        fires.append({"automation_id": 1, "due_at": at, "fired_at": at, "run_id": run_id, "scheduler": "pi"})
    with database.engine.begin() as connection:
        for model, rows in ((Run, runs), (ScriptLogEntry, entries), (RunClaim, claims), (AutomationFire, fires)):
            connection.execute(insert(model), rows)
    return first_id + 1440


def size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.parent.glob(path.name + "*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 days")
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--keep-days", type=float, default=Retention.keep_days)
    args = parser.parse_args()
    days = 60 if args.quick else args.days
    retention = Retention(keep_days=args.keep_days)
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "year.db"
        database = Database(f"sqlite:///{path}", checkpoint_apart=True)
        database.init()
        next_id, sizes, writes, purges = 1, [], [], []
        for day in range(days):
            started = time.perf_counter()
            next_id = write_day(database, day, next_id)
            writes.append(time.perf_counter() - started)
            started = time.perf_counter()
            purge(database.engine, retention, START + (day + 1) * DAY)
            purges.append(time.perf_counter() - started)
            database.checkpoint()
            sizes.append(size(path))
        kept_runs = int(retention.keep_days) * 1440
        full = min(int(retention.keep_days), days) - 1  # the last day nothing was purged yet
        unpurged = sizes[full] / (full + 1) * days
        print(
            f"{days} days of a run a minute ({days * 1440} runs, 4 log entries each), keep {retention.keep_days} days"
        )
        mb = [f"{value / 1e6:.1f} MB" for value in (sizes[full], max(sizes), sizes[-1], unpurged)]
        print(f"  file size (database and WAL): day {full + 1} {mb[0]}, largest {mb[1]}, last {mb[2]}")
        print(f"  unpurged it would be ~{mb[3]} (ratio {sizes[-1] / unpurged:.2f})")
        print(f"  {sizes[-1] / kept_runs:.0f} bytes a kept run, with its log, claim and fire")
        print(f"  daily purge: median {statistics.median(purges) * 1e3:.0f} ms, max {max(purges) * 1e3:.0f} ms; "
              f"writing the day's rows {statistics.median(writes) * 1e3:.0f} ms "
              f"(ratio {statistics.median(purges) / statistics.median(writes):.2f})")  # fmt: skip
        database.engine.dispose()


if __name__ == "__main__":
    main()
