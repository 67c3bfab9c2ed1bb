"""`manage.py broker-users`: the production broker's users, one per role, and where the parts read them.

Writes mosquitto's password file (hashed by `mosquitto_passwd`) and, for each role, an
environment file `<env_dir>/<user>.env` with the broker URL that role connects with; the
systemd units (deploy/systemd) read `hacer-<part>.env`, people and `manage.py status` use
`viewer.env`. Passwords are generated; running it again keeps them (parts already running stay
connected) unless asked to make new ones. The users are those mosquitto/acl names.
"""

from __future__ import annotations

import grp
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

USERS = (
    "hacer-bridge",
    "hacer-api",
    "hacer-runner",
    "hacer-recorder",
    "hacer-scheduler",
    "hacer-server",  # runserver as one service: the five parts in one process
    "hacer-script",
    "homeassistant",
    "viewer",
)
URL_SETTING, SCRIPT_URL_SETTING = "HACER_MQTT_URL", "HACER_SCRIPT_MQTT_URL"


class BrokerUsersError(Exception):
    """The users could not be written; the message says why."""


def write_users(password_file: Path, env_dir: Path, host: str, port: int, new_passwords: bool = False) -> list[str]:
    """Write the password file and every role's environment file; return the users whose password is new."""
    program = shutil.which("mosquitto_passwd")
    if program is None:
        raise BrokerUsersError("mosquitto_passwd is not installed (Debian: apt-get install mosquitto)")
    passwords: dict[str, str] = {}
    made: list[str] = []
    for user in USERS:
        kept = None if new_passwords else _password_in(env_dir / f"{user}.env", user)
        if kept is None:
            made.append(user)
        passwords[user] = kept or secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as work:
        hashed = Path(work) / "passwd"
        for user, password in passwords.items():
            flags = ["-b"] if hashed.exists() else ["-c", "-b"]
            done = subprocess.run([program, *flags, str(hashed), user, password], capture_output=True, text=True)
            if done.returncode != 0:
                raise BrokerUsersError(f"mosquitto_passwd failed: {done.stderr.strip()}")
        _write_private(password_file, hashed.read_text(), group="mosquitto")
    for user, password in passwords.items():
        lines = [f"{URL_SETTING}={_url(user, password, host, port)}"]
        if user in ("hacer-runner", "hacer-server"):  # a runner hands scripts their own user, never its own
            lines.append(f"{SCRIPT_URL_SETTING}={_url('hacer-script', passwords['hacer-script'], host, port)}")
        _write_private(env_dir / f"{user}.env", "".join(line + "\n" for line in lines), group="hacer")
    return made


def _url(user: str, password: str, host: str, port: int) -> str:
    return f"mqtt://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}"


def _password_in(env_file: Path, user: str) -> str | None:
    """The password of `user` in an environment file written before, if it is there."""
    try:
        lines = env_file.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        name, _, value = line.partition("=")
        if name.strip() == URL_SETTING:
            url = urlsplit(value.strip())
            if url.username == user and url.password:
                return unquote(url.password)
    return None


def _write_private(path: Path, text: str, group: str) -> None:
    """Write a file only its owner (and `group`, when that group exists) may read, replacing it whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        try:
            os.chown(partial, -1, grp.getgrnam(group).gr_gid)
            os.chmod(partial, 0o640)
        except (KeyError, PermissionError):  # no such group here, or not root: the owner alone
            os.chmod(partial, 0o600)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
