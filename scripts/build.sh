#!/usr/bin/env bash
# Configures (once) and builds incrementally into build/. Extra arguments go
# to the CMake configure step, e.g. -DFLOTILLA_ASAN=ON.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${FLOTILLA_BUILD_DIR:-$ROOT/build}"
JOBS="${FLOTILLA_JOBS:-$(nproc)}"
if [ ! -f "$BUILD/build.ninja" ] || [ "$#" -gt 0 ]; then
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
fi
cmake --build "$BUILD" -j "$JOBS"
