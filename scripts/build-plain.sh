#!/usr/bin/env bash
# A packager's build: `cmake -DCMAKE_BUILD_TYPE=Release` and a build of every
# target, with none of scripts/build.sh's settings (no FLOTILLA_WERROR, no
# minimal OpenSSL, CMake's default generator), then `cmake --install` into a
# scratch DESTDIR. It catches what our own scripts hide: a warning that only
# -Werror-free builds see, a dependency only build.sh passes, install rules
# that work only in our tree layout.
#
#   scripts/build-plain.sh [BUILD_DIR]     (default: build-plain/ beside build/)
#
# ccache is used when installed, through CMake's CMAKE_<LANG>_COMPILER_LAUNCHER
# environment variables rather than a -D flag, so a warm cache makes this a
# few minutes. scripts/test.sh runs it when FLOTILLA_PLAIN_BUILD=1 (.ci/run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build-plain}"
JOBS="${FLOTILLA_JOBS:-$(nproc)}"

if command -v ccache >/dev/null; then
  export CMAKE_C_COMPILER_LAUNCHER="${CMAKE_C_COMPILER_LAUNCHER:-ccache}"
  export CMAKE_CXX_COMPILER_LAUNCHER="${CMAKE_CXX_COMPILER_LAUNCHER:-ccache}"
fi
# CMAKE_BUILD_PARALLEL_LEVEL: the Makefile generator builds one job at a time otherwise.
export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"

mkdir -p "$BUILD"
echo "==> plain Release configure into $BUILD"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >"$BUILD/plain-configure.log" 2>&1 ||
  { cat "$BUILD/plain-configure.log"; echo "build-plain: configure failed" >&2; exit 1; }
echo "==> plain Release build of every target"
cmake --build "$BUILD" >"$BUILD/plain-build.log" 2>&1 ||
  { tail -60 "$BUILD/plain-build.log"; echo "build-plain: build failed (log: $BUILD/plain-build.log)" >&2; exit 1; }
echo "==> cmake --install into a scratch DESTDIR"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
DESTDIR="$stage" cmake --install "$BUILD" --prefix /usr >"$BUILD/plain-install.log" 2>&1 ||
  { cat "$BUILD/plain-install.log"; echo "build-plain: cmake --install failed" >&2; exit 1; }
for f in usr/bin/flotilla-hub usr/bin/flotilla usr/bin/flotilla-agent usr/lib/systemd/system/flotilla-hub.service \
         etc/flotilla/hub.yaml; do
  [ -e "$stage/$f" ] || { echo "build-plain: cmake --install did not install /$f" >&2; exit 1; }
done
"$stage/usr/bin/flotilla-hub" --version
echo "==> plain Release build passed"
