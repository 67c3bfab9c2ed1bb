"""Logging of every hacer process: the level, text or JSON lines, stderr or a rotated file per part."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import UTC, datetime

from hacer.settings import Settings, private_dir

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLines(logging.Formatter):
    """One JSON object a line: time (UTC), level, part, logger, message, and the exception if any."""

    def __init__(self, part: str) -> None:
        super().__init__()
        self.part = part

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "part": self.part,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(settings: Settings, part: str, verbose: bool = False) -> None:
    """Send this process's log where `settings` say, as they say (`verbose`: DEBUG whatever the level)."""
    handler: logging.Handler
    if settings.log_dir is not None:
        # A file per part: processes never share one, so rotating it is safe.
        handler = logging.handlers.RotatingFileHandler(
            private_dir(settings.log_dir) / f"{part}.log",
            maxBytes=settings.log_max_bytes,
            backupCount=settings.log_backups,
            encoding="utf-8",
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(part) if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:  # left open: a stream handler's stream is not its own
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else settings.log_level)
