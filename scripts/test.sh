#!/usr/bin/env bash
# Runs Flotilla's whole test suite: installs what is missing, builds
# incrementally into build/, then runs every test through CTest.
#
#   scripts/test.sh                 everything (unit, integration, e2e)
#   scripts/test.sh -L unit         only one tier (any ctest arguments work)
#   FLOTILLA_SANITIZE=address scripts/test.sh   an ASan+UBSan build in build-asan/
#   FLOTILLA_SANITIZE=thread scripts/test.sh    a ThreadSanitizer build in build-tsan/
#   FLOTILLA_PLAIN_BUILD=1                      also a plain `cmake -DCMAKE_BUILD_TYPE=Release` build (CI)
#   FLOTILLA_FUZZ_SECONDS=N                     how long each libFuzzer target runs (default 45; 0 = skip)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

"$ROOT/scripts/setup.sh"

cmake_args=()
# Sanitizers cannot link the fully static agent: those builds use a dynamic one.
case "${FLOTILLA_SANITIZE:-}" in
  "") ;;
  address)
    export FLOTILLA_BUILD_DIR="${FLOTILLA_BUILD_DIR:-$ROOT/build-asan}"
    cmake_args=(-DFLOTILLA_ASAN=ON -DFLOTILLA_UBSAN=ON -DFLOTILLA_STATIC_AGENT=OFF)
    export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1}"
    export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
    ;;
  thread)
    export FLOTILLA_BUILD_DIR="${FLOTILLA_BUILD_DIR:-$ROOT/build-tsan}"
    cmake_args=(-DFLOTILLA_TSAN=ON -DFLOTILLA_STATIC_AGENT=OFF)
    # Every report fails the test that caused it; tests/tsan.supp lists the
    # reports in code we do not own (each entry says why).
    export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1:suppressions=$ROOT/tests/tsan.supp}"
    ;;
  *) echo "test.sh: FLOTILLA_SANITIZE must be address or thread, got '$FLOTILLA_SANITIZE'" >&2; exit 2 ;;
esac
BUILD="${FLOTILLA_BUILD_DIR:-$ROOT/build}"

echo "==> building into $BUILD"
"$ROOT/scripts/build.sh" "${cmake_args[@]}"

# The aarch64 and armhf agents for the qemu-user tests (tests/CMakeLists.txt
# looks in <build>-<arch>/), on the same minimal OpenSSL as the host's agent,
# from one OpenSSL source download. Incremental after the first build.
if [ -z "${FLOTILLA_SANITIZE:-}" ]; then
  for arch in aarch64 armhf; do
    echo "==> building the $arch agent into $BUILD-$arch"
    FLOTILLA_OPENSSL_SRC_CACHE="$BUILD/third_party/openssl-min-src" FLOTILLA_CROSS_BUILD_DIR="$BUILD-$arch" \
      "$ROOT/scripts/build-agent-cross.sh" "$arch"
  done
fi

# A packager's plain Release build of every target, without our flags
# (scripts/build-plain.sh into <build>-plain/). CI sets FLOTILLA_PLAIN_BUILD=1.
if [ "${FLOTILLA_PLAIN_BUILD:-0}" = 1 ] && [ -z "${FLOTILLA_SANITIZE:-}" ]; then
  "$ROOT/scripts/build-plain.sh" "$BUILD-plain"
fi

# Prometheus's promtool checks /metrics (tests/e2e/metrics_promtool.sh).
"$ROOT/scripts/fetch-promtool.sh" "$BUILD/tools" || echo "==> promtool unavailable; that check will be skipped"

# The libFuzzer targets (clang, ASan) for a bounded time from the corpus kept
# in tests/fuzz/corpus/: a crash or a leak fails the run.
if [ -z "${FLOTILLA_SANITIZE:-}" ] && [ "${FLOTILLA_FUZZ_SECONDS:-45}" != 0 ]; then
  for target in bundle_verify agent_desired; do
    echo "==> fuzzing $target for ${FLOTILLA_FUZZ_SECONDS:-45} s"
    FLOTILLA_FUZZ_BUILD="$BUILD-fuzz" "$ROOT/tests/fuzz/run.sh" "${FLOTILLA_FUZZ_SECONDS:-45}" "$target" \
      >"$BUILD/fuzz-$target.log" 2>&1 || { tail -40 "$BUILD/fuzz-$target.log"; echo "==> fuzzing $target failed" >&2; exit 1; }
    grep -E "^(stat::number_of_executed_units|stat::new_units_added|Done )" "$BUILD/fuzz-$target.log" | sed 's/^/    /' || true
  done
fi

echo "==> running tests"
cd "$BUILD"
# Integration and e2e tests claim both cores (PROCESSORS 2), so they run one
# at a time while unit tests run in parallel.
# A sanitizer build has a dynamic agent: the tests of the static agent's size,
# of images that carry it and of the Debian packages that ship it belong to the
# normal build. The out-of-descriptors test uses up every descriptor of the
# test process on purpose, and UBSan's vptr check then fails on its own: it
# probes memory through a pipe it can no longer open and reports every
# polymorphic object it looks at (Boost.Asio's, Catch2's) as having an invalid
# vptr; the normal and ThreadSanitizer builds run it.
exclude=()
if [ "${FLOTILLA_SANITIZE:-}" = address ]; then
  exclude=(-E "statically linked, stripped|image inject|agent under qemu-user|Debian packages install|out of file descriptors")
elif [ -n "${FLOTILLA_SANITIZE:-}" ]; then
  exclude=(-E "statically linked, stripped|image inject|agent under qemu-user|Debian packages install")
fi
ctest --output-on-failure -j "$(nproc)" --timeout 900 "${exclude[@]}" "$@"
