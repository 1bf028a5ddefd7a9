#!/usr/bin/env bash
# Fuzzes a decoder (the IEC 62056-21 decoder and data-set parser by default, or the DLMS
# codecs: dlms_decoder) for a bounded time, then reports the
# corpus size and the run time. Exits non-zero if the fuzzer found a crash (the input is left
# in fuzz/artifacts/).
#
#   fuzz/run.sh [SECONDS] [TARGET]     default 60 iec62056_21_decoder (or dlms_decoder, mbus_decoder)
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). The corpus grows in
# fuzz/corpus/ (not committed; seeded from fuzz/seeds/ on every run).
set -euo pipefail

seconds="${1:-60}"
target="${2:-iec62056_21_decoder}"
cd "$(dirname "$0")/.."

corpus="fuzz/corpus/$target"
mkdir -p "$corpus"
for seed in fuzz/seeds/"$target"/*; do
    [ -e "$seed" ] || continue
    [ -e "$corpus/$(basename "$seed")" ] || cp "$seed" "$corpus/"
done

# Build first, so that the time below is fuzzing time.
cargo +nightly fuzz build "$target"

log="fuzz/last-run.log"
start=$(date +%s.%N)
status=0
cargo +nightly fuzz run "$target" "$corpus" -- \
    -max_total_time="$seconds" -max_len=8192 -print_final_stats=1 >"$log" 2>&1 || status=$?
end=$(date +%s.%N)

files=$(find "$corpus" -type f | wc -l)
bytes=$(du -sb "$corpus" | cut -f1)
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
printf 'target:   %s\n' "$target"
printf 'run time: %.1f s (asked for %s s)\n' "$(echo "$end - $start" | bc)" "$seconds"
printf 'corpus:   %s inputs, %s bytes (%s)\n' "$files" "$bytes" "$corpus"
printf 'executions: %s (%s/s), coverage: %s edges\n' "${execs:-?}" "${rate:-?}" "${cov:-?}"
if [ "$status" -ne 0 ]; then
    echo "the fuzzer failed (status $status); see $log and fuzz/artifacts/$target/" >&2
    tail -40 "$log" >&2
fi
exit "$status"
