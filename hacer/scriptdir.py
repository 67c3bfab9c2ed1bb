"""The scripts folder: which scripts exist, their 2015 ids, and their paths.

A script is a `.py` file directly in the folder. Names are looked up in the folder's listing,
never joined into a path from user text, so no name can reach outside the folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Script:
    """One script of the folder."""

    name: str
    path: Path

    @property
    def id(self) -> int:
        """The 2015 id: the first 8 hex digits of the MD5 of the name, as an integer."""
        return script_id(self.name)


def script_id(name: str) -> int:
    """Return the 2015 id of a script name."""
    return int(hashlib.md5(name.encode()).hexdigest()[:8], 16)


class ScriptDir:
    """The scripts in one folder, read afresh at each call (scripts may be added at any time)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def list(self) -> list[Script]:
        """Return the scripts, sorted by name."""
        return sorted(self._scripts(), key=lambda script: script.name)

    def find(self, name: str) -> Script | None:
        """Return the script called `name` (with or without `.py`), or None."""
        file_name = name if name.endswith(".py") else f"{name}.py"
        return next(self._scripts(file_name), None)

    def _scripts(self, only: str | None = None) -> Iterator[Script]:
        """The folder's scripts; with `only`, those of that file name (the others' file types are not read)."""
        try:
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    if (only is None or entry.name == only) and _is_script(entry):
                        yield Script(entry.name[:-3], Path(entry.path))
        except (FileNotFoundError, NotADirectoryError):
            return

    def find_id(self, script_id_: int) -> Script | None:
        """Return the script with this 2015 id, or None."""
        return next((s for s in self.list() if s.id == script_id_), None)


def _is_script(entry: os.DirEntry[str]) -> bool:
    return entry.name.endswith(".py") and not entry.name.startswith(("_", ".")) and entry.is_file()
