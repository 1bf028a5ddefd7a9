#!/usr/bin/env bash
# Runs the tests for an ARM target under qemu user emulation (docs/arm.md):
#
#   cross/test.sh armv7-unknown-linux-gnueabihf            # cargo test --lib
#   cross/test.sh aarch64-unknown-linux-gnu --lib -- bus::   # any cargo test arguments
#
# Test binaries are linked with Debian's cross gcc (.cargo/config.toml) and run by
# qemu-<arch>-static with the target's libc from libc6-<arch>-cross; the glibc version does
# not matter here, so zig is not needed. Installs what it needs once, like cross/build.sh.
set -euo pipefail
# shellcheck source=cross/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# -ge 1 && $1 != -* ]] || die "usage: cross/test.sh TARGET [cargo test arguments…]   (default: --lib)"
target_info "$1"
shift
args=("$@")
((${#args[@]})) || args=(--lib)

ensure_cross_packages
ensure_rust
# The runner: cargo calls it with the test binary and its arguments.
export "CARGO_TARGET_${TARGET_ENV}_RUNNER=$QEMU -L $QEMU_SYSROOT"
# Test builds for CI: no debug info (faster to build and link, far smaller to cache), no
# incremental state (nobody edits in this target dir).
export CARGO_PROFILE_TEST_DEBUG=${CARGO_PROFILE_TEST_DEBUG:-0}
export CARGO_PROFILE_DEV_DEBUG=${CARGO_PROFILE_DEV_DEBUG:-0}
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

log "Testing for $TARGET under $QEMU: cargo test --target $TARGET ${args[*]}"
cd "$AMR_EDGE_ROOT"
"$CARGO" test --locked --target "$TARGET" "${args[@]}"
