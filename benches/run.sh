#!/usr/bin/env bash
# Every benchmark in one go, each printing its table: the store and the drain, Modbus
# (coalescing, 1,000 meters, mbpoll), IEC 62056-21, M-Bus, DLMS/COSEM, the agent against the
# Celery way, what metrics cost with 1,000 meters, flash wear per reading, instructions per reading (callgrind), and the
# ARM binary (size; memory of the demo under qemu). Needs what the tests need (./tests/run.sh
# installs it) plus mbpoll; builds the ARM binary with cross/build.sh if it is not there.
#
#   benches/run.sh            everything
#   benches/run.sh backbone   one of: backbone modbus iec62056_21 mbus dlms compare metrics flash cpu arm
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-all}
run() { [ "$want" = all ] || [ "$want" = "$1" ]; }
section() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
command -v mbpoll >/dev/null || $sudo apt-get install -y -qq mbpoll >/dev/null
# The instruction count per reading (the cpu bench) runs the workload under callgrind.
if run cpu; then command -v valgrind >/dev/null || $sudo apt-get install -y -qq valgrind >/dev/null; fi
# The binary that ships is the release profile; `cargo bench` rebuilds target/release/amr-edge
# with the bench profile (optimised differently, see Cargo.toml), so the benchmarks that run
# the agent as a process measure a copy of the real one.
cargo build --release --quiet
mkdir -p target/shipped
cp target/release/amr-edge target/shipped/amr-edge
export AMR_EDGE_BIN=$PWD/target/shipped/amr-edge

for b in backbone modbus iec62056_21 mbus dlms compare metrics flash cpu; do
  if run "$b"; then
    section "$b"
    cargo bench --quiet --bench "$b" 2>/dev/null | sed -n '/^$/,$p'
  fi
done

if run arm; then
  section "arm"
  bin=$(cross/build.sh armv7-unknown-linux-gnueabihf 2>/dev/null)
  aarch=$(cross/build.sh aarch64-unknown-linux-gnu 2>/dev/null || true)
  printf '%-58s %s\n' "stripped armv7 binary" "$(stat -c %s "$bin") bytes ($(numfmt --to=iec-i --suffix=B "$(stat -c %s "$bin")"))"
  [ -n "$aarch" ] && printf '%-58s %s\n' "stripped aarch64 binary" "$(stat -c %s "$aarch") bytes ($(numfmt --to=iec-i --suffix=B "$(stat -c %s "$aarch")"))"
  # The demo for 20 s under qemu-arm: its Modbus meters (qemu-user cannot open a pty for the
  # IEC one), a store, a drain waiting for a broker. The memory is qemu's, emulator and
  # translated code included.
  dir=$(mktemp -d)
  qemu-arm-static -L /usr/arm-linux-gnueabihf "$bin" --log error demo --for 20s --every 1s \
    --data-dir "$dir/data" --amqp 'amqp://guest:guest@127.0.0.1:1/%2f' >/dev/null 2>&1 &
  pid=$!
  peak=0
  while kill -0 "$pid" 2>/dev/null; do
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ "${rss:-0}" -gt "$peak" ] && peak=$rss
    sleep 0.5
  done
  wait "$pid" || true
  printf '%-58s %s\n' "resident memory of the armv7 demo under qemu-arm (peak)" "$((peak / 1024)) MiB"
  rm -rf "$dir"
fi
