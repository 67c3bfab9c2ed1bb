"""mypy passes on the non-Flask code, and ruff's lint and format on everything."""

import subprocess
import sys

from hacer.settings import PROJECT_DIR

SOURCES = [
    "hacer",
    "ops",
    "scripting",
    "bridge",
    "runner",
    "recorder",
    "scheduler",
    "api",
    "emulator",
    "manage.py",
    "hasapi.py",
]


def test_mypy_is_clean():
    done = subprocess.run(
        [sys.executable, "-m", "mypy", *SOURCES], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_lint_and_format_are_clean():
    for command in (["check", "."], ["format", "--check", "."]):
        done = subprocess.run(
            [sys.executable, "-m", "ruff", *command], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
