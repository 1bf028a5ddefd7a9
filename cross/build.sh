#!/usr/bin/env bash
# Builds the release binary of amr-edge for an ARM gateway without docker (docs/arm.md).
#
#   cross/build.sh armv7-unknown-linux-gnueabihf
#   cross/build.sh aarch64-unknown-linux-gnu
#
# Installs what it needs once (apt: cross gcc, target libc, binutils, qemu; rustup target;
# zig from PyPI; cargo-zigbuild) and links against glibc 2.28 with cargo-zigbuild, so the
# binary runs on Debian 10 / Raspberry Pi OS buster and newer. See cross/lib.sh for the
# environment variables (AMR_EDGE_CACHE, CARGO_TARGET_DIR, AMR_EDGE_RUST, AMR_EDGE_LINKER,
# AMR_EDGE_GLIBC).
#
# Prints the path of the binary on stdout; everything else goes to stderr.
set -euo pipefail
# shellcheck source=cross/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# -eq 1 && $1 != -* ]] || die "usage: cross/build.sh TARGET   (armv7-unknown-linux-gnueabihf or aarch64-unknown-linux-gnu)"

start=$(now)
setup_build "$1"
log "Building amr-edge for $BUILD_TARGET: ${CARGO_BUILD[*]} (target dir $CARGO_TARGET_DIR)"
(cd "$AMR_EDGE_ROOT" && "${CARGO_BUILD[@]}" --release --locked --target "$BUILD_TARGET" --bin amr-edge >&2)

bin=$CARGO_TARGET_DIR/$TARGET/release/amr-edge
[[ -x $bin ]] || die "the build did not produce $bin"
log "Built $bin: $(stat -c %s "$bin") bytes, needs glibc $(max_glibc "$bin" | sed 's/GLIBC_//'), in $(($(now) - start))s"
echo "$bin"
