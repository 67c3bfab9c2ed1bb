"""mypy passes on the non-Flask code."""
import subprocess
import sys

from hacer.settings import PROJECT_DIR


def test_mypy_is_clean():
    done = subprocess.run([sys.executable, "-m", "mypy", "hacer", "bridge", "runner", "recorder", "api", "emulator", "manage.py", "hasapi.py"],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
