# shellcheck shell=bash disable=SC2034  # sets variables for the scripts that source it
# Shared by cross/build.sh, cross/test.sh, cross/deb.sh and .ci/arm.sh: finds, or installs
# once, the tools of the docker-free ARM build (docs/arm.md), and sets the environment for
# them. Source it; it defines functions and variables only.
#
# Environment:
#   AMR_EDGE_CACHE        tools and build outputs are kept here between runs
#                         (default ~/.cache/amr-edge)
#   CARGO_TARGET_DIR      default $AMR_EDGE_CACHE/target-arm
#   AMR_EDGE_RUST         rustup (default): rustup's toolchain and target;
#                         debian: Debian's rustc-web/cargo-web (1.85 in bookworm, newer from
#                         bookworm-security) and its ARM std (ARM.md path C);
#                         auto: rustup if it can add the target, else debian
#   AMR_EDGE_LINKER       zig (default): cargo-zigbuild, links against an old glibc (path A);
#                         gcc: Debian's cross gcc, links against Debian 12's glibc (path B)
#   AMR_EDGE_GLIBC        glibc version to link against with zig (default 2.28)

AMR_EDGE_CACHE=${AMR_EDGE_CACHE:-$HOME/.cache/amr-edge}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$AMR_EDGE_CACHE/target-arm}
AMR_EDGE_RUST=${AMR_EDGE_RUST:-rustup}
AMR_EDGE_LINKER=${AMR_EDGE_LINKER:-zig}
AMR_EDGE_GLIBC=${AMR_EDGE_GLIBC:-2.28}

# Pinned so that a build is reproducible and known to work: cargo-zigbuild 0.21.8 is the
# newest that builds with Rust 1.85 (path C), and its CI tests zig 0.15.2.
CARGO_ZIGBUILD_VERSION=0.21.8
ZIGLANG_VERSION=0.15.2
CARGO_DEB_VERSION=3.8.0

AMR_EDGE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS_DIR=$AMR_EDGE_CACHE/tools
export PATH=$TOOLS_DIR/bin:$PATH

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
	printf 'error: %s\n' "$*" >&2
	exit 1
}

if [[ $(id -u) -eq 0 ]]; then
	SUDO=()
elif command -v sudo >/dev/null; then
	SUDO=(sudo)
else
	SUDO=(false)
fi

# The triple's names elsewhere: GNU triplet of the cross tools, Debian architecture, qemu.
target_info() {
	case $1 in
	armv7-unknown-linux-gnueabihf)
		GNU_TRIPLET=arm-linux-gnueabihf DEB_ARCH=armhf QEMU=qemu-arm-static
		;;
	aarch64-unknown-linux-gnu)
		GNU_TRIPLET=aarch64-linux-gnu DEB_ARCH=arm64 QEMU=qemu-aarch64-static
		;;
	*) die "unsupported target '$1' (armv7-unknown-linux-gnueabihf or aarch64-unknown-linux-gnu)" ;;
	esac
	TARGET=$1
	# Where qemu finds the target's dynamic loader and libc (libc6-<arch>-cross).
	QEMU_SYSROOT=/usr/$GNU_TRIPLET
	# The CARGO_TARGET_<TRIPLE>_… spelling of the triple.
	TARGET_ENV=$(tr 'a-z-' 'A-Z_' <<<"$TARGET")
}

# apt_install PKG…: installs the packages that are not installed yet (one `apt-get update`
# per run, and only if something is missing).
APT_UPDATED=
apt_install() {
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	command -v apt-get >/dev/null || die "missing ${missing[*]}, and no apt-get to install them: install them by hand"
	log "Installing ${missing[*]} (apt)"
	if [[ -z $APT_UPDATED ]]; then
		"${SUDO[@]}" apt-get update -qq >&2 || die "apt-get update failed"
		APT_UPDATED=1
	fi
	DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
		die "apt-get install ${missing[*]} failed"
}

# The cross linker, the target's libc (headers for ring's C code; loader and libc for qemu),
# binutils for readelf/objdump, and qemu.
# A host C compiler too: build scripts and proc macros are linked for the build machine.
ensure_cross_packages() {
	apt_install "gcc-$GNU_TRIPLET" "libc6-dev-$DEB_ARCH-cross" "binutils-$GNU_TRIPLET" qemu-user-static
	command -v cc >/dev/null || apt_install gcc libc6-dev
}

# cargo_tool NAME VERSION: makes `NAME` available, installing the pinned version into the
# cache if it is not on PATH already. Uses $CARGO (the build's cargo) for `cargo install`.
cargo_tool() {
	local name=$1 version=$2
	if command -v "$name" >/dev/null; then
		return 0
	fi
	log "Installing $name $version into $TOOLS_DIR (once; cargo install)"
	"${CARGO:-cargo}" install --locked --quiet --root "$TOOLS_DIR" "$name" --version "$version" >&2 ||
		die "cargo install $name $version failed"
}

# Zig from PyPI (the `ziglang` wheel) in a virtualenv of its own, so that neither a
# PEP 668 "externally managed" system Python nor a zig on PATH of another version matters.
ensure_zig() {
	if [[ -n ${CARGO_ZIGBUILD_ZIG_PATH:-} ]]; then
		return 0
	fi
	local venv=$AMR_EDGE_CACHE/ziglang-$ZIGLANG_VERSION
	if [[ ! -x $venv/bin/python3 ]] || ! "$venv/bin/python3" -c 'import ziglang' 2>/dev/null; then
		log "Installing zig $ZIGLANG_VERSION from PyPI into $venv (once)"
		command -v python3 >/dev/null || apt_install python3
		python3 -m venv "$venv" 2>/dev/null || {
			apt_install python3-venv
			rm -rf "$venv"
			python3 -m venv "$venv"
		} || die "cannot create a Python virtualenv in $venv"
		"$venv/bin/python3" -m pip install --quiet --disable-pip-version-check "ziglang==$ZIGLANG_VERSION" >&2 ||
			die "pip install ziglang==$ZIGLANG_VERSION failed"
	fi
	CARGO_ZIGBUILD_ZIG_PATH=$("$venv/bin/python3" -c 'import os, ziglang; print(os.path.join(os.path.dirname(ziglang.__file__), "zig"))')
	export CARGO_ZIGBUILD_ZIG_PATH
}

# Debian's Rust (rustc-web) and the target's standard library from Debian, of the same version
# (ARM.md path C): the newest version that the Debian archive has both for the build machine
# (rustc-web, cargo-web) and for the target (libstd-rust-web-dev:<arch>); bookworm has 1.85, and
# bookworm-security may have newer ones. Installing libstd-rust-web-dev:<arch> as a foreign
# package has unmet dependencies, so it is unpacked into /; a stamp in the cache says which
# version is there, and a different one replaces it (two std versions in one sysroot clash).
use_debian_rust() {
	export RUSTC=/usr/bin/rustc
	CARGO=/usr/bin/cargo
	local stamp=$AMR_EDGE_CACHE/debian-std-$TARGET.version
	# Set up by an earlier run, and nothing changed since: no apt at all.
	if [[ -f $stamp && $(dpkg-query -W -f='${Version}\n' rustc-web cargo-web 2>/dev/null | sort -u) == "$(cat "$stamp")" ]] &&
		compgen -G "/usr/lib/rustlib/$TARGET/lib/libstd-*.rlib" >/dev/null; then
		return 0
	fi
	command -v apt-get >/dev/null || die "AMR_EDGE_RUST=debian needs apt-get"
	if ! dpkg --print-foreign-architectures | grep -qx "$DEB_ARCH"; then
		log "Adding the foreign architecture $DEB_ARCH to dpkg (for apt-get download of its std)"
		"${SUDO[@]}" dpkg --add-architecture "$DEB_ARCH" >&2
		APT_UPDATED=
	fi
	if [[ -z $APT_UPDATED ]]; then
		# A mirror caught mid-sync fails one index; apt then uses the others, and so do we.
		"${SUDO[@]}" apt-get update -qq >&2 || warn "apt-get update reported errors; going on with the indexes it has"
		APT_UPDATED=1
	fi
	local version
	version=$(comm -12 \
		<(apt-cache madison rustc-web | awk -F' *[|] *' '{print $2}' | sort -u) \
		<(apt-cache madison "libstd-rust-web-dev:$DEB_ARCH" | awk -F' *[|] *' '{print $2}' | sort -u) |
		sort -V | tail -n 1)
	[[ -n $version ]] || die "the apt indexes have no rustc-web version that also has libstd-rust-web-dev:$DEB_ARCH"
	if [[ $(dpkg-query -W -f='${Version}' rustc-web 2>/dev/null) != "$version" ||
		$(dpkg-query -W -f='${Version}' cargo-web 2>/dev/null) != "$version" ]]; then
		log "Installing rustc-web and cargo-web $version (apt)"
		DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends --allow-downgrades \
			"rustc-web=$version" "cargo-web=$version" "libstd-rust-web-dev=$version" >&2 ||
			die "apt-get install rustc-web=$version cargo-web=$version failed"
	fi
	if [[ ! -f $stamp || $(cat "$stamp") != "$version" ]]; then
		log "Unpacking libstd-rust-web-dev:$DEB_ARCH $version into /"
		local dl deb
		dl=$(mktemp -d)
		(cd "$dl" && apt-get download -qq "libstd-rust-web-dev:$DEB_ARCH=$version" >&2) ||
			die "cannot download libstd-rust-web-dev:$DEB_ARCH=$version"
		"${SUDO[@]}" rm -rf "/usr/lib/rustlib/$TARGET"
		for deb in "$dl"/*.deb; do
			"${SUDO[@]}" dpkg -x "$deb" / >&2
		done
		rm -rf "$dl"
		compgen -G "/usr/lib/rustlib/$TARGET/lib/libstd-*.rlib" >/dev/null ||
			die "libstd-rust-web-dev:$DEB_ARCH has no std for $TARGET in /usr/lib/rustlib"
		mkdir -p "$AMR_EDGE_CACHE"
		echo "$version" >"$stamp"
	fi
}

# Picks the toolchain (rustup or Debian) and makes the target's std available. Sets CARGO.
ensure_rust() {
	CARGO=cargo
	case $AMR_EDGE_RUST in
	rustup | auto)
		if command -v rustup >/dev/null; then
			if rustup target list --installed | grep -qx "$TARGET"; then
				return 0
			fi
			log "Adding the Rust target $TARGET (rustup)"
			if rustup target add "$TARGET" >&2; then
				return 0
			fi
		fi
		[[ $AMR_EDGE_RUST == auto ]] || die "rustup cannot provide $TARGET; try AMR_EDGE_RUST=debian (ARM.md path C)"
		warn "rustup cannot provide $TARGET: falling back to Debian's Rust (ARM.md path C)"
		use_debian_rust
		;;
	debian) use_debian_rust ;;
	*) die "AMR_EDGE_RUST must be rustup, debian or auto, not '$AMR_EDGE_RUST'" ;;
	esac
}

# Sets up everything for building $TARGET: toolchain, linker, cross packages. Afterwards
# CARGO_BUILD (an array) is the cargo command to build with: `cargo zigbuild` or `cargo build`,
# and ZIG_TARGET the --target argument.
setup_build() {
	target_info "$1"
	ensure_cross_packages
	ensure_rust
	# Plain `cargo build` (tests, path B) links with Debian's cross gcc, named in
	# .cargo/config.toml. Not exported here: cargo-zigbuild leaves a linker that is already
	# set in the environment alone, and the binary would silently need Debian 12's glibc.
	case $AMR_EDGE_LINKER in
	zig)
		ensure_zig
		cargo_tool cargo-zigbuild "$CARGO_ZIGBUILD_VERSION"
		CARGO_BUILD=("$CARGO" zigbuild)
		BUILD_TARGET=$TARGET.$AMR_EDGE_GLIBC
		;;
	gcc)
		warn "linking with $GNU_TRIPLET-gcc against Debian's own glibc: the binary will not run on older gateway firmware (path B)"
		CARGO_BUILD=("$CARGO" build)
		BUILD_TARGET=$TARGET
		;;
	*) die "AMR_EDGE_LINKER must be zig or gcc, not '$AMR_EDGE_LINKER'" ;;
	esac
}

# The highest GLIBC_x.y symbol version FILE needs, from its version-needs section (the cross
# binutils' readelf: installed with the cross packages, unlike the host's binutils).
max_glibc() {
	"$GNU_TRIPLET-readelf" -V --wide "$1" | grep -o 'GLIBC_[0-9][0-9.]*' | sort -u -V | tail -n 1
}

# Seconds since the epoch, for timings.
now() { date +%s; }
