"""deploy/: the systemd units pass `systemd-analyze verify`; the nginx site passes `nginx -t` and carries
REST, Socket.IO (websocket and long polling, sticky) and browsers' MQTT to real processes over TLS."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import requests
import socketio
import websocket

from hacer.settings import PROJECT_DIR
from ops.broker import port_answers

from support import free_port, wait_until

DEPLOY = PROJECT_DIR / "deploy"
INSTALLED = "/opt/hacer"  # where docs/deploy.md installs the project


def test_systemd_units_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    units = []
    for unit in (DEPLOY / "systemd").glob("hacer*"):
        text = unit.read_text().replace(INSTALLED, str(PROJECT_DIR))
        name = unit.name.replace("@.", "@5001.")  # a template is verified as an instance
        (tmp_path / name).write_text(text.replace("%i", "5001") if "@" in unit.name else text)
        units.append(str(tmp_path / name))
    assert len(units) == 7
    done = subprocess.run([analyze, "verify", "--man=no", *units], capture_output=True, text=True, cwd=tmp_path)
    # verify exits 0 on directives it ignores; every line it prints is one of those.
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.fixture
def nginx(tmp_path):
    """The site of deploy/nginx/hacer.conf in a real nginx on free loopback ports, in front of two api ports."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if binary is None:
        pytest.skip("nginx is not installed (`./setup.sh --dev` installs nginx-light)")
    tls = tmp_path / "tls"
    tls.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=hacer",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tls / "hacer.key"), "-out", str(tls / "hacer.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    ports = {"http": free_port(), "https": free_port(), "api": [free_port(), free_port()], "ca": str(tls / "hacer.crt")}
    site = (DEPLOY / "nginx" / "hacer.conf").read_text()
    replacements = [
        (INSTALLED, str(PROJECT_DIR)),
        ("/etc/hacer/tls", str(tls)),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{ports['https']} ssl http2;"),
        ("listen 80;", f"listen 127.0.0.1:{ports['http']};"),
        ("server 127.0.0.1:5001;", f"server 127.0.0.1:{ports['api'][0]};"),
        ("server 127.0.0.1:5002;", f"server 127.0.0.1:{ports['api'][1]};"),
    ]
    for old, new in replacements:
        assert old in site, f"deploy/nginx/hacer.conf no longer has {old!r}: update this test"
        site = site.replace(old, new)
    site = re.sub(r"^\s*listen \[::\].*\n", "", site, flags=re.MULTILINE)  # loopback only here
    (tmp_path / "hacer.conf").write_text(site)
    for temp in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / temp).mkdir()
    (tmp_path / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"worker_processes 1;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log {tmp_path}/access.log;\n  include /etc/nginx/mime.types;\n"
        + "".join(f"  {temp}_temp_path {tmp_path}/{temp};\n" for temp in ("fastcgi", "uwsgi", "scgi", "proxy"))
        + f"  client_body_temp_path {tmp_path}/body;\n  include {tmp_path}/hacer.conf;\n}}\n"
    )
    command = [binary, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen([*command, "-g", "daemon off;"], stderr=subprocess.PIPE)
    try:
        wait_until(lambda: port_answers("127.0.0.1", ports["https"]), 10, "nginx to listen")
        yield ports
    finally:
        process.terminate()
        process.wait(10)


def test_nginx_carries_rest_and_websockets_over_tls_and_no_broker(nginx, spawn, hacer_env):
    for port in nginx["api"]:
        spawn(["api"], {**hacer_env, "HACER_HTTP_PORT": str(port)}, name=f"api-{port}")
    for port in nginx["api"]:
        wait_until(lambda port=port: port_answers("127.0.0.1", port), 30, f"the api on {port}")
    site, ca = f"https://127.0.0.1:{nginx['https']}", nginx["ca"]

    assert requests.get(site + "/api/nodes", verify=ca, timeout=10).json() == {"node_list": []}
    page = requests.get(site + "/static/app.js", verify=ca, timeout=10)
    assert page.status_code == 200 and page.headers["X-Frame-Options"] == "DENY"
    too_big = requests.post(site + "/api/nodes/id/1", data="x" * 70_000, verify=ca, timeout=10)
    assert too_big.status_code == 413
    plain = requests.get(f"http://127.0.0.1:{nginx['http']}/api/nodes", allow_redirects=False, timeout=10)
    assert plain.status_code == 301 and plain.headers["Location"].startswith("https://")

    for transports in (["websocket"], ["polling"]):  # polling: every request to the same api process
        trusting = requests.Session()  # engineio takes the CA of both transports from here
        trusting.verify, trusting.trust_env = ca, False  # (REQUESTS_CA_BUNDLE would win otherwise)
        client = socketio.Client(reconnection=False, http_session=trusting)
        snapshots: list[dict] = []
        client.on("snapshot", snapshots.append)
        client.connect(site, transports=transports, wait_timeout=10)
        wait_until(lambda snapshots=snapshots: snapshots, 10, f"a snapshot over {transports[0]}")
        client.disconnect()

    # No MQTT over websockets behind nginx: /mqtt is the api's (an unknown path), not the broker's.
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        mqtt_url = f"wss://127.0.0.1:{nginx['https']}/mqtt"
        websocket.create_connection(mqtt_url, subprotocols=["mqtt"], sslopt={"ca_certs": ca}, suppress_origin=True)
    assert refused.value.status_code in (400, 404)


def test_compose_file_and_image_fit_the_project(hacer_env):
    """No Docker engine runs here: the compose file is checked against the Compose schema and the
    project, the Dockerfile against the project, and each part's command against manage.py."""
    import json

    import jsonschema
    import yaml

    from ops.brokerusers import USERS

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    schema = json.loads((PROJECT_DIR / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)  # the draft the schema names
    services = compose["services"]
    parts = {name: service for name, service in services.items() if "command" in service}
    assert sorted(parts) == ["api", "bridge", "recorder", "runner", "scheduler"]
    for name, service in parts.items():
        assert service["command"] == name and service["env_file"] == ["config/hacer.env", f"config/hacer-{name}.env"]
        assert f"hacer-{name}" in USERS  # broker-users writes that file
        shown = subprocess.run(
            [sys.executable, str(PROJECT_DIR / "manage.py"), name, "-h"], env=hacer_env, capture_output=True
        )
        assert shown.returncode == 0, name
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("../"):
                assert (DEPLOY / source).exists(), source
    config = [line.split() for line in (PROJECT_DIR / "mosquitto" / "production.conf").read_text().splitlines()]
    named = ("password_file", "acl_file", "certfile", "keyfile", "persistence_location")
    broker_files = {words[1] for words in config if words and words[0] in named}
    mounted = [volume.split(":")[1] for volume in services["mosquitto"]["volumes"]]
    for path in broker_files:
        assert any(path.startswith(target.rstrip("/")) for target in mounted), path

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copied = [
        line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ") and "--from" not in line
    ]
    for sources in copied:
        for source in sources:
            assert (PROJECT_DIR / source).exists(), source
    packages = {path.parent.name for path in PROJECT_DIR.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages | {"scripts", "mosquitto"} <= {source for sources in copied for source in sources}
    assert 'ENTRYPOINT ["python", "manage.py"]' in dockerfile
