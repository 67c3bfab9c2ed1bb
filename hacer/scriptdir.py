"""The scripts folder: which scripts exist, their 2015 ids, and their paths.

A script is a `.py` file directly in the folder. Names are looked up in the folder's listing,
never joined into a path from user text, so no name can reach outside the folder.
"""

from __future__ import annotations

import hashlib
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
        if not self.folder.is_dir():
            return []
        return sorted(
            (
                Script(path.stem, path)
                for path in self.folder.iterdir()
                if path.suffix == ".py" and path.is_file() and not path.name.startswith(("_", "."))
            ),
            key=lambda script: script.name,
        )

    def find(self, name: str) -> Script | None:
        """Return the script called `name` (with or without `.py`), or None."""
        wanted = name[:-3] if name.endswith(".py") else name
        return next((s for s in self.list() if s.name == wanted), None)

    def find_id(self, script_id_: int) -> Script | None:
        """Return the script with this 2015 id, or None."""
        return next((s for s in self.list() if s.id == script_id_), None)
