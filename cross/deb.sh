#!/usr/bin/env bash
# Packages the release binary that cross/build.sh built into a .deb (docs/arm.md):
#
#   cross/deb.sh armv7-unknown-linux-gnueabihf     # amr-edge_<version>-1_armhf.deb
#   cross/deb.sh aarch64-unknown-linux-gnu         # amr-edge_<version>-1_arm64.deb
#
# Does not build: run cross/build.sh TARGET first (with the same CARGO_TARGET_DIR). Installs
# cargo-deb once. Prints the path of the package on stdout.
set -euo pipefail
# shellcheck source=cross/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# -eq 1 && $1 != -* ]] || die "usage: cross/deb.sh TARGET   (armv7-unknown-linux-gnueabihf or aarch64-unknown-linux-gnu)"
target_info "$1"
bin=$CARGO_TARGET_DIR/$TARGET/release/amr-edge
[[ -x $bin ]] || die "no $bin: run cross/build.sh $TARGET first"
CARGO=${CARGO:-cargo}
cargo_tool cargo-deb "$CARGO_DEB_VERSION"

out=$CARGO_TARGET_DIR/$TARGET/debian
mkdir -p "$out"
log "Packaging $bin for $DEB_ARCH"
# --no-strip: the release profile strips already, and cargo-deb would need the target's strip.
# cargo deb prints the path of the package on stdout, and everything else on stderr.
deb=$(cd "$AMR_EDGE_ROOT" && "$CARGO" deb --no-build --no-strip --locked --target "$TARGET" --output "$out" | tail -n 1)
[[ -f $deb ]] || die "cargo deb did not leave a package (it said '$deb')"
log "Packaged $deb ($(stat -c %s "$deb") bytes)"
echo "$deb"
