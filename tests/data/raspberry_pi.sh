#!/bin/bash
# tests/system/test_raspberry_pi.py: the namespaces' set-up and systemd's stand-ins, then the guide's
# commands ($work/guide.sh), then what the guide says of `manage.py status` when something is wrong.
set -euo pipefail
work=$1
mount --make-rprivate /
cp -a /etc "$work/etc" && mount --bind "$work/etc" /etc
# /opt gets /opt/hacer beside what it holds (this checkout or the interpreter may live there too).
mkdir "$work/project" "$work/opt" && mount --bind "$PROJECT" "$work/project" && mount --bind /opt "$work/opt"
for place in /var/lib /var/backups /opt; do mount -t tmpfs tmpfs "$place"; done
for kept in "$work"/opt/*; do
  [ -e "$kept" ] && [ "${kept##*/}" != hacer ] || continue
  if [ -d "$kept" ]; then mkdir "/opt/${kept##*/}"; else touch "/opt/${kept##*/}"; fi
  mount --bind "$kept" "/opt/${kept##*/}"
done
mkdir /opt/hacer && mount --bind "$work/project" /opt/hacer
ip link set lo up
hostname raspberrypi
echo "127.0.0.1 raspberrypi raspberrypi.local" >> /etc/hosts
mkdir -p /etc/mosquitto/conf.d /etc/nginx/sites-available /etc/nginx/sites-enabled /etc/cron.d
install -d -o mosquitto /var/lib/mosquitto && mkdir /var/lib/nginx
printf 'persistence true\npersistence_location /var/lib/mosquitto/\ninclude_dir /etc/mosquitto/conf.d\n' > /etc/mosquitto/mosquitto.conf
cd /opt/hacer

answers() { python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$1" 2>/dev/null; }
until_true() {  # what a person does after a start: look again until it is up
  local deadline=$((SECONDS + 90)); until "$@"; do (( SECONDS < deadline )) || return 1; sleep 0.5; done
}
status_ok() { (set -a; . /etc/hacer/hacer.env; . /etc/hacer/viewer.env; set +a; .venv/bin/python manage.py status >/dev/null); }
BROKER= SERVER=
start_broker() { mosquitto -c /etc/mosquitto/mosquitto.conf >>"$work/mosquitto.log" 2>&1 & BROKER=$!; until_true answers 1883; }
stop_broker() { if [ -n "$BROKER" ]; then kill "$BROKER"; wait "$BROKER" || true; BROKER=; fi; }
start_server() { install -d -m 0700 -o hacer -g hacer /var/lib/hacer; (eval "$UNIT_START") >>"$work/hacer-server.log" 2>&1 & SERVER=$!; until_true status_ok; }
stop_server() { kill -TERM "$SERVER"; wait "$SERVER"; SERVER=; }
cleanup() { set +e; [ -z "$SERVER" ] || { kill -TERM "$SERVER"; wait "$SERVER"; }; [ -z "$BROKER" ] || kill "$BROKER"; }
trap cleanup EXIT
apt-get() { echo "(stand-in) apt-get $*"; }
git() { echo "(stand-in) git $*"; }
systemctl() {
  case "$*" in
    "daemon-reload"|"reload nginx") ;;
    "restart mosquitto") stop_broker; start_broker ;;
    "enable --now hacer-server"|"start hacer-server") start_server ;;
    "stop hacer-server") stop_server ;;
    "restart hacer-server") stop_server; start_server ;;
    *) echo "no stand-in for systemctl $*" >&2; return 1 ;;
  esac
}
nginx() { if grep -qs sites-enabled /etc/nginx/nginx.conf; then command nginx "$@"; else echo "(no nginx.conf here)"; fi; }

. "$work/guide.sh"

echo "=== cron"
line=$(cat /etc/cron.d/hacer-backup); rm /var/backups/hacer/*.db
sh -c "$(echo "$line" | cut -d' ' -f7- | sed 's/\\%/%/g')"
ls /var/backups/hacer/*.db
echo "=== stopped"
systemctl stop hacer-server
(set -a; . /etc/hacer/hacer.env; . /etc/hacer/viewer.env; set +a; .venv/bin/python manage.py status) && exit 1 || echo "exit $?"
stop_broker
echo "=== no broker"
(set -a; . /etc/hacer/hacer.env; . /etc/hacer/viewer.env; set +a; .venv/bin/python manage.py status) && exit 1 || echo "exit $?"
