#!/usr/bin/env bash
# Runs the whole test suite on a Debian machine with Rust: installs and starts what the tests
# talk to (RabbitMQ, Mosquitto, socat, faketime, openssl, Prometheus, Python's venv, FUSE 3 for the
# power-cut filesystem; the tests make their own virtualenv with Celery, pymodbus and mfusepy
# from PyPI), then `cargo test`. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
command -v mosquitto >/dev/null || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null || missing+=(mosquitto-clients)
command -v socat >/dev/null || missing+=(socat)
command -v faketime >/dev/null || missing+=(faketime)
command -v openssl >/dev/null || missing+=(openssl)
# fusermount3 and libfuse3, for tests/powercut (which also needs /dev/fuse and root).
command -v fusermount3 >/dev/null || missing+=(fuse3)
# Prometheus and promtool, for tests/metrics (started by the test on a free loopback port).
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
[ -d /usr/share/zoneinfo ] || missing+=(tzdata)
if [ ${#missing[@]} -gt 0 ]; then
  echo "Installing: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# RabbitMQ and Mosquitto on 127.0.0.1, started the way the machines start them.
if ! as_root rabbitmqctl -q status >/dev/null 2>&1; then
  echo "Starting RabbitMQ"
  as_root rabbitmq-server -detached
fi
as_root rabbitmqctl -q await_startup --timeout 120 >/dev/null
if ! pgrep -x mosquitto >/dev/null; then
  echo "Starting Mosquitto"
  as_root mosquitto -d -c /etc/mosquitto/mosquitto.conf
fi
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null && break; sleep 0.2; done

exec cargo test "$@"
