"""A mosquitto child process started from the project's own config files.

`render_config` rewrites a config's listener ports and file paths (nothing else), so
`runserver` and the test fixtures run exactly the settings in mosquitto/ on the ports and in
the folders they choose.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from hacer.settings import PROJECT_DIR, private_dir

log = logging.getLogger(__name__)

CONFIG_DIR = PROJECT_DIR / "mosquitto"


class BrokerError(RuntimeError):
    """mosquitto is missing or did not start."""


def render_config(
    template: Path,
    ports: list[int],
    data_dir: Path,
    password_file: Path | None = None,
    acl_file: Path | None = None,
    user: str | None = None,
    tls_files: tuple[Path, Path] | None = None,
) -> str:
    """Return `template` with its listeners on `ports` (in order) and its files in `data_dir`.

    `user` keeps a broker started by root as the invoking user, so it can write the data
    folder wherever that is (mosquitto otherwise switches to its own user).
    """
    lines = []
    remaining = list(ports)
    for line in template.read_text().splitlines():
        words = line.split()
        if words[:1] == ["listener"] and len(words) >= 2:
            if not remaining:
                raise BrokerError(f"{template} has more listeners than the {len(ports)} ports given")
            line = " ".join(["listener", str(remaining.pop(0)), *words[2:]])
        elif words[:1] == ["persistence_location"]:
            line = f"persistence_location {data_dir}/"
        elif words[:1] == ["password_file"] and password_file is not None:
            line = f"password_file {password_file}"
        elif words[:1] == ["acl_file"] and acl_file is not None:
            line = f"acl_file {acl_file}"
        elif words[:1] in (["certfile"], ["keyfile"]) and tls_files is not None:
            line = f"{words[0]} {tls_files[0] if words[0] == 'certfile' else tls_files[1]}"
        lines.append(line)
    if not any(line.startswith("persistence_location ") for line in lines):  # production.conf leaves it to Debian's
        lines.append(f"persistence_location {data_dir}/")
    if user is not None:
        lines.append(f"user {user}")
    return "\n".join(lines) + "\n"


def port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Tell whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def mosquitto_binary() -> str:
    """Return the mosquitto executable, or raise BrokerError saying how to install it."""
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError("mosquitto is not installed: run `sudo apt-get install mosquitto mosquitto-clients`")


class BrokerProcess:
    """A mosquitto child process on the given ports with its files in `work_dir`."""

    def __init__(
        self,
        work_dir: Path,
        ports: list[int],
        template: Path = CONFIG_DIR / "dev.conf",
        host: str = "127.0.0.1",
        password_file: Path | None = None,
        acl_file: Path | None = None,
        tls_files: tuple[Path, Path] | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.tls_files = tls_files
        self.ports = ports
        self.template = template
        self.host = host
        self.password_file = password_file
        self.acl_file = acl_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """The first (MQTT) listener's port."""
        return self.ports[0]

    @property
    def url(self) -> str:
        """The broker's mqtt:// URL."""
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start mosquitto and wait until every listener accepts connections.

        mosquitto opens its listeners in order and exits when one cannot be had (a port taken since
        it was chosen): answering on the first port alone does not mean it stays up.
        """
        command, listening = self.prepare()
        log_file = open(self.work_dir / "mosquitto.log", "ab")
        self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()
        deadline = time.monotonic() + timeout
        while not all(port_answers(self.host, port, timeout=0.2) for port in listening):
            if self.process.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with {self.process.returncode}: "
                    f"{(self.work_dir / 'mosquitto.log').read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"mosquitto did not listen on {listening} within {timeout} s")
            time.sleep(0.02)  # polling a port that has no event to wait on

    def prepare(self) -> tuple[list[str], list[int]]:
        """Write the config; return mosquitto's command line and the ports it will listen on."""
        if port_answers(self.host, self.port, timeout=0.2):  # else that process would be taken for this one
            raise BrokerError(f"port {self.port} is in use by another process")
        data_dir = self.work_dir / "data"
        private_dir(data_dir)
        config = self.work_dir / "mosquitto.conf"
        rendered = render_config(
            self.template,
            self.ports,
            data_dir,
            self.password_file,
            self.acl_file,
            user=pwd.getpwuid(os.geteuid()).pw_name,
            tls_files=self.tls_files,
        )
        config.write_text(rendered)
        listening = [int(line.split()[1]) for line in rendered.splitlines() if line.startswith("listener ")]
        return [mosquitto_binary(), "-c", str(config)], listening

    def stop(self, kill: bool = False) -> None:
        """Stop mosquitto (SIGKILL when `kill`, as a crash would)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, kill: bool = False) -> None:
        """Stop and start again on the same ports with the same files."""
        self.stop(kill=kill)
        self.start()
