"""docs/raspberry-pi.md, followed: every command of its blocks, as written, in namespaces of the test's
own (a copy of /etc, empty /var/lib, /var/backups and /opt, a loopback of its own, the host name
`raspberrypi`), so they change nothing outside. What a test machine cannot do is stood in for:
apt-get, git clone and setup.sh (this checkout is the installed project, at /opt/hacer), and
systemd, whose part is played as it would: `hacer-server` is the unit's ExecStart with its
EnvironmentFiles (run as root: this machine's interpreter is not readable by another user),
mosquitto is Debian's mosquitto reading /etc/mosquitto."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

import pytest

from hacer.settings import PROJECT_DIR

GUIDE = PROJECT_DIR / "docs" / "raspberry-pi.md"
UNIT = PROJECT_DIR / "deploy" / "systemd" / "hacer-server.service"
HARNESS = PROJECT_DIR / "tests" / "data" / "raspberry_pi.sh"
SKIPPED = ("./setup.sh",)  # the checkout is set up already (CI runs it first)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("mosquitto"),
    reason="needs root, unshare and mosquitto",
)


def guide_commands() -> list[str]:
    """The commands of the guide's indented blocks that are commands (not sample output)."""
    commands, in_sample = [], False
    for line in GUIDE.read_text().splitlines():
        if not line.startswith("    "):
            if line.strip():
                in_sample = line.rstrip().endswith(("(exit code 1):", "(exit code 2):"))
            continue
        if not in_sample and line.strip() not in SKIPPED:
            commands.append(line.strip())
    return commands


def sample_outputs() -> list[list[str]]:
    """The guide's sample outputs of `manage.py status`, by exit code 1 then 2."""
    text = GUIDE.read_text()
    samples = re.findall(r"\(exit code [12]\):\n\n((?:    .*\n)+)", text)
    return [[line.strip() for line in sample.splitlines()] for sample in samples]


def unit_start() -> str:
    """A shell command that does what systemd does to start hacer-server.service."""
    unit = UNIT.read_text()
    env_files = re.findall(r"^EnvironmentFile=(.*)$", unit, re.MULTILINE)
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.MULTILINE).group(1)
    directory = re.search(r"^WorkingDirectory=(.*)$", unit, re.MULTILINE).group(1)
    environment = re.findall(r"^Environment=(.*)$", unit, re.MULTILINE)
    sources = " ".join(f". {shlex.quote(path.replace('%p', 'hacer-server'))};" for path in env_files)
    exports = " ".join(f"export {shlex.quote(assignment)};" for assignment in environment)
    return f"set -a; {sources} set +a; {exports} cd {directory} && exec {exec_start}"


def test_the_raspberry_pi_guide_runs_as_written(tmp_path):
    steps = []
    for command in guide_commands():  # each shown, then run; the first that fails ends it (`a && b` too)
        steps.append(f"echo {shlex.quote('$ ' + command)}\n{{ {command}\n}} || {{ echo FAILED; exit 1; }}\n")
    (tmp_path / "guide.sh").write_text("".join(steps))
    done = subprocess.run(
        ["unshare", "--mount", "--net", "--uts", "bash", str(HARNESS), str(tmp_path)],
        env={**os.environ, "PROJECT": str(PROJECT_DIR), "UNIT_START": unit_start()},
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in tmp_path.glob("*.log"))
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:] + logs
    out = done.stdout
    token = re.search(r"^\$ sed -n 's/\^HACER_API_TOKEN=//p' .*\n(.+)$", out, re.MULTILINE).group(1)
    assert len(token) >= 32 and token != "CHANGE-ME"
    assert '"node_list"' in out  # the phone's REST call, with the token
    assert re.search(r"^\$ mosquitto_sub .* -u homeassistant .*\nonline$", out, re.MULTILINE)  # its user, over TLS
    stopped, no_broker = out.split("=== stopped", 1)[1].split("=== no broker")
    first, second = sample_outputs()
    assert "exit 1" in stopped and "exit 2" in no_broker
    for line in first:
        assert line in stopped, (line, stopped)
    for line in second:
        assert line in no_broker, (line, no_broker)
    server_url = (tmp_path / "etc" / "hacer" / "hacer-server.env").read_text()
    password = re.search(r"//hacer-server:([^@]+)@", server_url).group(1)
    assert password not in (tmp_path / "hacer-server.log").read_text(), "a broker password in the service's log"
