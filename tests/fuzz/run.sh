#!/usr/bin/env bash
# Fuzzes for a bounded time: trust-chain and bundle parsing/verification
# (target bundle_verify), or the agent's desired-state path (agent_desired:
# decoding, the director header checks, handle_desired over in-memory fakes).
#
#   tests/fuzz/run.sh [SECONDS] [TARGET]
#                                   build with clang++-14 into build-fuzz/ and fuzz
#                                   TARGET (bundle_verify, the default, or
#                                   agent_desired) for SECONDS (default 60); exits
#                                   non-zero on a crash or leak
#   tests/fuzz/run.sh --write-seeds regenerate the checked-in seed corpora from
#                                   bundles::fuzz::seed_inputs() and
#                                   agent::fuzz::seed_inputs() (needs a normal build:
#                                   FLOTILLA_BUILD_DIR, default build/)
#
# New interesting inputs go to build-fuzz/corpus[-TARGET]/; the checked-in seeds
# (tests/fuzz/corpus/ for bundle_verify, tests/fuzz/corpus/agent_desired/ for
# agent_desired) are read, never written. A crash leaves crash-<sha1> in
# build-fuzz/: add it to the target's corpus with the fix, so the unit tests
# replay it from then on.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"

if [ "${1:-}" = "--write-seeds" ]; then
  exec "${FLOTILLA_BUILD_DIR:-$ROOT/build}/bin/flotilla_unit_tests" "[write-seeds]"
fi

SECONDS_TO_RUN="${1:-60}"
TARGET="${2:-bundle_verify}"
case "$TARGET" in
  bundle_verify) SEEDS="$ROOT/tests/fuzz/corpus"; OUT_CORPUS=corpus ;;
  agent_desired) SEEDS="$ROOT/tests/fuzz/corpus/agent_desired"; OUT_CORPUS=corpus-agent_desired ;;
  *) echo "run.sh: unknown target '$TARGET' (bundle_verify or agent_desired)" >&2; exit 2 ;;
esac
BUILD="${FLOTILLA_FUZZ_BUILD:-$ROOT/build-fuzz}"
CXX_BIN="${FUZZ_CXX:-clang++-14}"
CC_BIN="${FUZZ_CC:-clang-14}"
if ! command -v "$CXX_BIN" >/dev/null; then
  echo "run.sh: $CXX_BIN not found; install clang-14 and libclang-rt-14-dev (apt-get install clang-14 libclang-rt-14-dev)" >&2
  exit 2
fi

cmake -S "$ROOT/tests/fuzz" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER="$CC_BIN" -DCMAKE_CXX_COMPILER="$CXX_BIN" >/dev/null
cmake --build "$BUILD" -j"${FUZZ_JOBS:-2}" --target "fuzz_$TARGET"
mkdir -p "$BUILD/$OUT_CORPUS"
cd "$BUILD"
# detect_leaks: a leak is a failure too. max_len: well above the seeds, far
# below the 4 MiB caps (those are tested directly in the unit tests).
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
  "./fuzz_$TARGET" -max_total_time="$SECONDS_TO_RUN" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
  -print_final_stats=1 "$BUILD/$OUT_CORPUS" "$SEEDS"
