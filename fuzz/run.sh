#!/usr/bin/env bash
# Builds the fuzz targets on STABLE Rust with libFuzzer coverage instrumentation and runs them.
#
#   bash fuzz/run.sh build                 # build every target, run nothing
#   bash fuzz/run.sh [target|all] [secs]   # fuzz one target (or each in turn) for secs (default 60)
#   bash fuzz/run.sh all 120 -dict=x.dict  # anything after secs goes to libFuzzer as is
#
# Targets: http_head http_chunked ws_frame envelope_json envelope_msgpack zstd socketio.
# Each run works on a scratch copy of fuzz/corpus/<target> in fuzz/target/scratch/<target>, so the
# committed corpus does not grow; crashes land in fuzz/artifacts/<target>/ (both are gitignored).
# Environment: JOBS (cargo -j, default 2), MAX_LEN (default 4096).
#
# This is what `cargo fuzz build` / `cargo fuzz run` do, minus `-Zsanitizer=address`, the one
# nightly-only flag: see fuzz/README.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
all_targets=(http_head http_chunked ws_frame envelope_json envelope_msgpack zstd socketio)

what="${1:-all}"
secs="${2:-60}"
shift $(($# > 2 ? 2 : $#))
jobs="${JOBS:-2}"
max_len="${MAX_LEN:-4096}"

case "$what" in
  build | all) targets=("${all_targets[@]}") ;;
  *)
    if [[ " ${all_targets[*]} " != *" $what "* ]]; then
      echo "unknown target '$what'; one of: build all ${all_targets[*]}" >&2
      exit 2
    fi
    targets=("$what")
    ;;
esac
if ! [[ "$secs" =~ ^[0-9]+$ ]]; then
  echo "seconds must be a whole number, got '$secs'" >&2
  exit 2
fi

# The flags cargo-fuzz passes (sancov: 8-bit edge counters, PC table, comparison tracing; the
# `fuzzing` cfg; debug assertions and overflow checks), all stable. An explicit --target keeps
# them off build scripts and proc macros, which must not be instrumented (they would not link
# without libFuzzer's runtime).
host="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS="${RUSTFLAGS:-} -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"

cargo build \
  --manifest-path "$here/Cargo.toml" \
  --release \
  --target "$host" \
  --target-dir "$here/target" \
  -j "$jobs" \
  --bins

[[ "$what" == build ]] && exit 0

status=0
for t in "${targets[@]}"; do
  bin="$here/target/$host/release/$t"
  corpus="$here/corpus/$t"
  scratch="$here/target/scratch/$t"
  artifacts="$here/artifacts/$t"
  rm -rf "$scratch"
  mkdir -p "$scratch" "$artifacts"
  if [[ -d "$corpus" ]]; then
    cp -R "$corpus/." "$scratch/"
  fi
  echo "=== $t: ${secs}s over $(find "$scratch" -type f | wc -l) seed(s) ==="
  if ! "$bin" \
    -max_total_time="$secs" \
    -max_len="$max_len" \
    -timeout=10 \
    -print_final_stats=1 \
    -artifact_prefix="$artifacts/" \
    "$@" \
    "$scratch"; then
    echo "!!! $t failed: see $artifacts/" >&2
    status=1
  fi
done
exit "$status"
