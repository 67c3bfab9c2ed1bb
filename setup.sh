#!/usr/bin/env bash
# Set up hacer on a fresh Debian/Ubuntu machine: system packages (as root), the virtual
# environment in .venv and the pinned Python packages. Safe to run again: it only adds what is
# missing. `./setup.sh --dev` adds the test dependencies.
set -euo pipefail
cd "$(dirname "$0")"

dev=false
[ "${1:-}" = "--dev" ] && dev=true

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
# mosquitto_sub/_pub: for watching the bus by hand, and the recorder benchmark's baseline.
command -v mosquitto_sub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)  # the control app's Socket.IO client
# The browser test drives Debian's Chromium (no browser download).
$dev && ! command -v chromium >/dev/null 2>&1 && need_apt+=(chromium)
# The deployment test runs deploy/nginx/hacer.conf in a real nginx (its own, on loopback ports).
$dev && ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ] && need_apt+=(nginx-light)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q && apt-get install -y -q "${need_apt[@]}"
        # Debian starts a system broker on 1883; hacer starts its own when it needs one.
    else
        echo "setup: missing ${need_apt[*]}; install with: sudo apt-get install -y ${need_apt[*]}" >&2
        exit 1
    fi
fi

requirements=requirements.txt
$dev && requirements=requirements-dev.txt
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=".venv/.installed-$(cat requirements.txt "$requirements" | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -r "$requirements"
    touch "$stamp"
fi

# A real Home Assistant for the discovery test, in an environment of its own (a few minutes, once).
if $dev; then
    ha_stamp=".venv-ha/.installed-$(sha256sum requirements-ha.txt | cut -c1-16)"
    if [ ! -e "$ha_stamp" ]; then
        python3 -m venv .venv-ha
        .venv-ha/bin/python -m pip install -q --disable-pip-version-check -r requirements-ha.txt
        touch "$ha_stamp"
    fi
fi

# The control app's browser dependencies, pinned in package.json / package-lock.json.
if [ ! -e node_modules/socket.io-client/dist/socket.io.min.js ]; then
    npm ci --omit=dev --no-audit --no-fund --loglevel=error
fi
