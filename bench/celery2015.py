"""The 2015 design, for bench_runner.py to run beside hacer: Celery + Redis, a prefork pool of 4,
a task that starts the script with Popen and reports its first output line through Redis.

The worker is started by the benchmark (`celery -A bench.celery2015 worker ...`) with
BENCH_REDIS_URL naming the Redis database to use.
"""

from __future__ import annotations

import os
import subprocess
import sys

import redis
from celery import Celery

app = Celery("hacer2015", broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15"))
app.conf.update(task_ignore_result=True, worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True)
_redis: redis.Redis | None = None


@app.task(name="run_script")
def run_script(script: str, params: list[str], channel: str) -> int:
    """Run a script as the 2015 runner did; publish its first line (and then its exit code) on `channel`."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(app.conf.broker_url)
    process = subprocess.Popen([sys.executable, script, *params], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    _redis.publish(channel, b"output " + process.stdout.readline())
    for _ in process.stdout:
        pass
    code = process.wait()
    _redis.publish(channel, b"exit %d" % code)
    return code
