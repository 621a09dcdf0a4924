#!/usr/bin/env bash
# Configures (once) and builds incrementally into build/. Extra arguments go
# to the CMake configure step, e.g. -DFLOTILLA_ASAN=ON.
#
# The static agent links a minimal OpenSSL built from Debian's source package
# into build/third_party/openssl-min first (scripts/build-openssl-min.sh: a
# few minutes the first time, a no-op after).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${FLOTILLA_BUILD_DIR:-$ROOT/build}"
JOBS="${FLOTILLA_JOBS:-$(nproc)}"
OPENSSL_MIN="$BUILD/third_party/openssl-min"

static_agent=ON
if printf '%s\n' "$@" | grep -Eq '^-DFLOTILLA_STATIC_AGENT(:BOOL)?=(OFF|0|FALSE|NO)$' ||
  { [ "$#" -eq 0 ] && grep -Eq '^FLOTILLA_STATIC_AGENT:BOOL=(OFF|0|FALSE|NO)$' "$BUILD/CMakeCache.txt" 2>/dev/null; }; then
  static_agent=OFF
fi

configure_args=("$@")
if [ "$static_agent" = ON ]; then
  FLOTILLA_JOBS="$JOBS" "$ROOT/scripts/build-openssl-min.sh" "$OPENSSL_MIN"
  configure_args+=("-DFLOTILLA_AGENT_OPENSSL_ROOT=$OPENSSL_MIN")
fi
if [ ! -f "$BUILD/build.ninja" ] || [ "$#" -gt 0 ] || ! grep -q "^FLOTILLA_WERROR:BOOL=ON\$" "$BUILD/CMakeCache.txt" ||
  { [ "$static_agent" = ON ] && ! grep -q "^FLOTILLA_AGENT_OPENSSL_ROOT:PATH=$OPENSSL_MIN\$" "$BUILD/CMakeCache.txt"; }; then
  # Our own scripts make warnings fatal (a plain CMake build does not).
  echo "==> configuring $BUILD" >&2
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFLOTILLA_WERROR=ON \
    "${configure_args[@]}" >/dev/null
fi
echo "==> compiling into $BUILD ($JOBS jobs)" >&2
cmake --build "$BUILD" -j "$JOBS"
