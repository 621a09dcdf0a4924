#!/usr/bin/env bash
# Runs Flotilla's whole test suite: installs what is missing, builds
# incrementally into build/, then runs every test through CTest.
#
#   scripts/test.sh                 everything (unit, integration, e2e)
#   scripts/test.sh -L unit         only one tier (any ctest arguments work)
#   FLOTILLA_SANITIZE=address scripts/test.sh   an ASan+UBSan build in build-asan/
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

"$ROOT/scripts/setup.sh"

cmake_args=()
if [ "${FLOTILLA_SANITIZE:-}" = "address" ]; then
  export FLOTILLA_BUILD_DIR="${FLOTILLA_BUILD_DIR:-$ROOT/build-asan}"
  cmake_args=(-DFLOTILLA_ASAN=ON -DFLOTILLA_UBSAN=ON)
fi
BUILD="${FLOTILLA_BUILD_DIR:-$ROOT/build}"

echo "==> building into $BUILD"
"$ROOT/scripts/build.sh" "${cmake_args[@]}"

# The aarch64 agent for the qemu-user test (tests/CMakeLists.txt looks in
# <build>-aarch64/). Incremental after the first build (~2.5 min on 2 cores).
if [ -z "${FLOTILLA_SANITIZE:-}" ]; then
  echo "==> building the aarch64 agent into $BUILD-aarch64"
  FLOTILLA_CROSS_BUILD_DIR="$BUILD-aarch64" "$ROOT/scripts/build-agent-cross.sh" aarch64
fi

# Prometheus's promtool checks /metrics (tests/e2e/metrics_promtool.sh).
"$ROOT/scripts/fetch-promtool.sh" "$BUILD/tools" || echo "==> promtool unavailable; that check will be skipped"

echo "==> running tests"
cd "$BUILD"
# Integration and e2e tests claim both cores (PROCESSORS 2), so they run one
# at a time while unit tests run in parallel.
ctest --output-on-failure -j "$(nproc)" --timeout 900 "$@"
