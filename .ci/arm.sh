#!/usr/bin/env bash
# CI for the ARM gateways (docs/arm.md), on a plain Debian 12 x86_64 machine without docker:
#
#   1. builds the armv7 release binary with cross/build.sh (zig, glibc 2.28);
#   2. checks with readelf and objdump that it needs no glibc symbol newer than 2.28;
#   3. runs it under qemu-arm-static: --version, `check` on every boards/*/*.toml, and
#      `demo` for 8 s with a data dir of its own, then `status` on that data dir must show
#      buffered readings;
#   4. runs the unit tests (cargo test --lib) for armv7 under qemu;
#   5. builds the aarch64 release binary the same way (glibc check, --version under qemu);
#   6. builds the armhf and arm64 .deb packages and checks what dpkg-deb says is in them;
#   7. systemd-analyze verify on the unit.
#
# Installs what is missing (apt, rustup target, zig from PyPI, cargo-zigbuild, cargo-deb) and
# keeps tools and build outputs between runs in $AMR_EDGE_CACHE. Prints a timing per step.
#
# Environment:
#   AMR_EDGE_CACHE        cache of tools and build outputs (default ~/.cache/amr-edge);
#                         CARGO_TARGET_DIR defaults to $AMR_EDGE_CACHE/target-arm
#   AMR_EDGE_ARM_AARCH64  1 (default): also build, check and package aarch64; 0: armv7 only
#   AMR_EDGE_ARM_OUT      where the binaries and packages are copied (default $AMR_EDGE_CACHE/out)
# and those of cross/lib.sh. Exit status 0 only if every check passed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=cross/lib.sh
source cross/lib.sh

AARCH64=${AMR_EDGE_ARM_AARCH64:-1}
OUT=${AMR_EDGE_ARM_OUT:-$AMR_EDGE_CACHE/out}
MAX_GLIBC=2.28
ARMV7=armv7-unknown-linux-gnueabihf
AARCH64_TARGET=aarch64-unknown-linux-gnu
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)

RUN_START=$(now)
STEPS=()
step_start=
step() {
	step_end
	CURRENT_STEP=$1
	step_start=$(now)
	printf '\n=== %s\n' "$1" >&2
}
step_end() {
	if [[ -n $step_start ]]; then
		STEPS+=("$(printf '%5ss  %s' "$(($(now) - step_start))" "$CURRENT_STEP")")
		step_start=
	fi
}
summary() {
	local rc=$?
	step_end
	printf '\n=== timings\n' >&2
	printf '%s\n' "${STEPS[@]}" >&2
	printf '%5ss  total\n' "$(($(now) - RUN_START))" >&2
	if [[ $rc -eq 0 ]]; then
		printf '\nARM CI passed.\n' >&2
	else
		printf '\nARM CI FAILED (exit %s) in: %s\n' "$rc" "${CURRENT_STEP:-setup}" >&2
	fi
}
trap summary EXIT
fail() {
	printf 'FAIL: %s\n' "$*" >&2
	exit 1
}

# The binary must not need a glibc symbol version above $MAX_GLIBC, and must be a stripped
# executable for the right machine with the right loader.
check_binary() {
	local bin=$1 machine=$2 loader=$3 triplet=$4
	local versions max objdump_max
	versions=$("$triplet-readelf" -V --wide "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sort -u -V)
	[[ -n $versions ]] || fail "$bin: readelf found no GLIBC symbol versions (not a glibc binary?)"
	max=$(tail -n 1 <<<"$versions" | sed 's/GLIBC_//')
	# objdump -T lists each dynamic symbol with its version: the same answer from the symbols' side.
	objdump_max=$("$triplet-objdump" -T "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -u -V | tail -n 1)
	echo "glibc versions needed: $(tr '\n' ' ' <<<"$versions")" >&2
	if [[ $(printf '%s\n%s\n' "$max" "$MAX_GLIBC" | sort -V | tail -n 1) != "$MAX_GLIBC" ||
		$(printf '%s\n%s\n' "$objdump_max" "$MAX_GLIBC" | sort -V | tail -n 1) != "$MAX_GLIBC" ]]; then
		echo "symbols that need more than glibc $MAX_GLIBC:" >&2
		"$triplet-objdump" -T "$bin" | sed -n 's/.*(GLIBC_\([0-9.]*\)) *\(.*\)$/\1 \2/p' |
			while read -r v sym; do
				[[ $(printf '%s\n%s\n' "$v" "$MAX_GLIBC" | sort -V | tail -n 1) == "$MAX_GLIBC" ]] || echo "  $sym (GLIBC_$v)" >&2
			done
		fail "$bin needs glibc $max (objdump: $objdump_max), more than $MAX_GLIBC"
	fi
	echo "max glibc: $max (readelf), $objdump_max (objdump) <= $MAX_GLIBC: ok" >&2
	# Whole outputs first, then grep: `grep -q` in a pipe can end it early (SIGPIPE, pipefail).
	local header segments sections
	header=$("$triplet-readelf" -h "$bin")
	segments=$("$triplet-readelf" -l "$bin")
	sections=$("$triplet-readelf" -S --wide "$bin")
	grep -q "Machine: *$machine\$" <<<"$header" || fail "$bin is not a $machine executable"
	grep -q "interpreter: $loader\]" <<<"$segments" || fail "$bin does not use the loader $loader"
	! grep -q '\.symtab' <<<"$sections" || fail "$bin is not stripped (.symtab present)"
	echo "$(stat -c %s "$bin") bytes, $machine, loader $loader, stripped: ok" >&2
}

# qemu_run TARGET ARGS…: runs the binary of TARGET under qemu user emulation.
qemu_run() {
	local target=$1
	shift
	target_info "$target"
	"$QEMU" -L "$QEMU_SYSROOT" "$@"
}

# dpkg-deb must show the package, its architecture and dependencies, and every file it must ship.
check_deb() {
	local deb=$1 arch=$2 info contents
	info=$(dpkg-deb --info "$deb")
	contents=$(dpkg-deb --contents "$deb")
	echo "$info" >&2
	echo "$contents" >&2
	grep -q "^ Package: amr-edge$" <<<"$info" || fail "$deb: not package amr-edge"
	grep -q "^ Version: $VERSION-1$" <<<"$info" || fail "$deb: not version $VERSION-1"
	grep -q "^ Architecture: $arch$" <<<"$info" || fail "$deb: not architecture $arch"
	grep -q "^ Depends: .*libc6 (>= $MAX_GLIBC)" <<<"$info" || fail "$deb: does not depend on libc6 (>= $MAX_GLIBC)"
	grep -q "^ Depends: .*adduser" <<<"$info" || fail "$deb: does not depend on adduser"
	local f
	for f in conffiles postinst postrm prerm; do
		grep -q -E "^ +[0-9]+ bytes, +[0-9]+ lines +\*? *$f( |$)" <<<"$info" || fail "$deb: no $f in the control archive"
	done
	for f in ./usr/bin/amr-edge ./etc/amr-edge/config.toml ./usr/lib/systemd/system/amr-edge.service \
		./usr/share/doc/amr-edge/README.md ./usr/share/doc/amr-edge/examples/raspberry-pi.toml \
		./usr/share/doc/amr-edge/examples/revolution-pi.toml ./usr/share/doc/amr-edge/examples/siemens-iot2050.toml; do
		grep -q -E " $f$" <<<"$contents" || fail "$deb: $f missing"
	done
	grep -q -E '^-rwxr-xr-x (root/root|0/0) .* \./usr/bin/amr-edge$' <<<"$contents" || fail "$deb: /usr/bin/amr-edge is not root-owned 0755"
	grep -q '^ Description: amr-edge meter agent: polls, buffers and drains meter readings$' <<<"$info" || fail "$deb: no proper short description"
	! grep -q -E ' \./var/lib/amr-edge/?$' <<<"$contents" || fail "$deb ships /var/lib/amr-edge, which belongs to systemd (StateDirectory)"
	# The control files themselves: conffile, user creation, the unit's systemd handling.
	local ctl
	ctl=$(mktemp -d)
	dpkg-deb --control "$deb" "$ctl"
	grep -qx /etc/amr-edge/config.toml "$ctl/conffiles" || fail "$deb: /etc/amr-edge/config.toml is not a conffile"
	for f in postinst postrm prerm; do
		sh -n "$ctl/$f" || fail "$deb: $f is not a valid shell script"
		! grep -q '#DEBHELPER#' "$ctl/$f" || fail "$deb: $f still has the #DEBHELPER# token"
	done
	grep -q 'adduser --system --group' "$ctl/postinst" || fail "$deb: postinst does not create the user"
	grep -q 'adduser --quiet amr-edge dialout' "$ctl/postinst" || fail "$deb: postinst does not add the user to dialout"
	grep -q 'deb-systemd-helper' "$ctl/postinst" || fail "$deb: postinst has no systemd handling"
	# The packaged binary is the one that was checked.
	local unpacked
	unpacked=$(mktemp -d)
	dpkg-deb -x "$deb" "$unpacked"
	cmp -s "$unpacked/usr/bin/amr-edge" "$3" || fail "$deb: /usr/bin/amr-edge is not the binary built and checked above"
	verify_unit "$unpacked/usr/lib/systemd/system/amr-edge.service"
	rm -rf "$ctl" "$unpacked"
	echo "$deb: package, architecture, dependencies, files, conffile, maintainer scripts: ok" >&2
}

# systemd-analyze verify, where systemd is installed. The only complaint allowed is that
# /usr/bin/amr-edge does not exist on the CI machine.
verify_unit() {
	local unit=$1 out unexpected
	if ! command -v systemd-analyze >/dev/null; then
		echo "systemd-analyze not installed: unit not verified" >&2
		return 0
	fi
	out=$(systemd-analyze verify "$unit" 2>&1) || true
	unexpected=$(grep -v -E '^$|Command /usr/bin/amr-edge is not executable' <<<"$out" || true)
	[[ -z $unexpected ]] || fail "systemd-analyze verify $unit: $unexpected"
	echo "systemd-analyze verify $unit: ok" >&2
}

mkdir -p "$OUT"
echo "cache $AMR_EDGE_CACHE, target dir $CARGO_TARGET_DIR, artifacts $OUT" >&2

step "build $ARMV7 (release, cross/build.sh)"
armv7_bin=$(cross/build.sh "$ARMV7")

step "glibc and ELF checks ($ARMV7)"
target_info "$ARMV7"
check_binary "$armv7_bin" ARM /lib/ld-linux-armhf.so.3 "$GNU_TRIPLET"

step "qemu: --version, check on every board config, demo ($ARMV7)"
version=$(qemu_run "$ARMV7" "$armv7_bin" --version)
[[ $version == "amr-edge $VERSION" ]] || fail "--version said '$version', not 'amr-edge $VERSION'"
echo "--version: $version" >&2
shopt -s nullglob
configs=(boards/*/*.toml)
shopt -u nullglob
((${#configs[@]} >= 3)) || fail "expected at least 3 board configs, found ${#configs[@]}"
for config in "${configs[@]}"; do
	plan=$(qemu_run "$ARMV7" "$armv7_bin" check --config "$config" 2>&1) || {
		echo "$plan" >&2
		fail "check --config $config"
	}
	grep -q "^config .*: valid$" <<<"$plan" || fail "check --config $config did not say valid: $plan"
	echo "check --config $config: valid, $(grep -c '^  meter ' <<<"$plan") meters on $(grep -c '^bus ' <<<"$plan") buses" >&2
done
target_info "$ARMV7"
demo_dir=$(mktemp -d)
# Port 1 on loopback: no broker answers there (not even one a CI machine runs for other
# tests), so every reading stays in the store for `status` to count.
demo_log=$demo_dir/demo.log
if ! timeout 120 "$QEMU" -L "$QEMU_SYSROOT" "$armv7_bin" demo --for 8s --every 1s \
	--data-dir "$demo_dir/data" --amqp 'amqp://guest:guest@127.0.0.1:1/%2f' >"$demo_log" 2>&1; then
	cat "$demo_log" >&2
	fail "demo under qemu did not exit cleanly"
fi
polls=$(grep -c 'Polled and buffered' "$demo_log" || true)
grep -q 'Store flushed, agent stopped' "$demo_log" || {
	cat "$demo_log" >&2
	fail "demo did not flush its store and stop"
}
cat >"$demo_dir/status.toml" <<EOF
[gateway]
id = "demo-gw"
data_dir = "$demo_dir/data"

[amqp]
url = "amqp://guest:guest@127.0.0.1:1/%2f"
EOF
status=$(qemu_run "$ARMV7" "$armv7_bin" status --config "$demo_dir/status.toml" --json)
buffered=$(grep -o '"readings": *[0-9]*' <<<"$status" | head -n 1 | grep -o '[0-9]*$' || true)
[[ ${buffered:-0} -gt 0 ]] || {
	echo "$status" >&2
	fail "status shows no buffered readings after the demo"
}
echo "demo: $polls polls buffered in 8 s; status on its data dir: $buffered readings buffered" >&2
rm -rf "$demo_dir"

step "unit tests under qemu ($ARMV7, cross/test.sh --lib)"
cross/test.sh "$ARMV7" --lib

if [[ $AARCH64 == 1 ]]; then
	step "build $AARCH64_TARGET (release, cross/build.sh)"
	aarch64_bin=$(cross/build.sh "$AARCH64_TARGET")

	step "glibc and ELF checks, qemu --version ($AARCH64_TARGET)"
	target_info "$AARCH64_TARGET"
	check_binary "$aarch64_bin" AArch64 /lib/ld-linux-aarch64.so.1 "$GNU_TRIPLET"
	version=$(qemu_run "$AARCH64_TARGET" "$aarch64_bin" --version)
	[[ $version == "amr-edge $VERSION" ]] || fail "--version said '$version', not 'amr-edge $VERSION'"
	echo "--version: $version" >&2
fi

step "packages (cross/deb.sh, dpkg-deb --info/--contents)"
armhf_deb=$(cross/deb.sh "$ARMV7")
check_deb "$armhf_deb" armhf "$armv7_bin"
cp "$armv7_bin" "$OUT/amr-edge-$ARMV7"
cp "$armhf_deb" "$OUT/"
if [[ $AARCH64 == 1 ]]; then
	arm64_deb=$(cross/deb.sh "$AARCH64_TARGET")
	check_deb "$arm64_deb" arm64 "$aarch64_bin"
	cp "$aarch64_bin" "$OUT/amr-edge-$AARCH64_TARGET"
	cp "$arm64_deb" "$OUT/"
fi

step "systemd unit"
verify_unit packaging/amr-edge.service

step_end
printf '\n=== artifacts in %s\n' "$OUT" >&2
ls -l "$OUT" >&2
