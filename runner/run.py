"""A claimed run as the runner's parts share it, and how a runner behaves."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from hacer.messages import RunRequest
from runner.launcher import ScriptProcess
from runner.leftovers import Birth


@dataclass(frozen=True)
class RunnerConfig:
    """How a runner behaves; see Settings for the environment variables."""

    runner_id: str
    capacity: int = 4
    default_timeout: float = 300.0
    max_timeout: float = 24 * 3600.0
    cancel_grace: float = 5.0
    takeover_after: float = 10.0
    line_limit: int = 8192
    output_limit: int = 64 * 1024 * 1024
    python: str = sys.executable
    script_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Run:
    """One claimed run, from queued to finished."""

    request: RunRequest
    run_id: str
    script_path: Path
    queued_at: float
    seq: int = 0
    process: ScriptProcess | None = None
    launch_token: str = ""
    birth: Birth = Birth(-1, 0)  # when it was launched: its leftovers were created since
    cancel_requested: bool = False
    timed_out: bool = False
    started_at: float | None = None
    fenced: bool = False  # another runner owns it now: publish nothing more of it
    output_deadline: float | None = None  # monotonic: when reading its output stops, whoever holds the pipe
    lock: threading.Lock = field(default_factory=threading.Lock)
