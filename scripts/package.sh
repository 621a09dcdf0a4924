#!/usr/bin/env bash
# Builds the Debian packages flotilla-hub, flotilla and flotilla-agent
# (CPack DEB; docs/adr/0012-debian-packages-with-cpack.md) from a build
# tree, into <build>/packages/. The binaries are the build's own: after
# scripts/build.sh, nothing is recompiled.
#
#   scripts/package.sh              package build/ (building it first)
#   scripts/package.sh --no-build   package what build/ holds (the packaging test)
#   FLOTILLA_BUILD_DIR=DIR          another build tree
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${FLOTILLA_BUILD_DIR:-$ROOT/build}"

build=1
for a in "$@"; do
  case "$a" in
    --no-build) build=0 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "package.sh: unknown argument '$a'" >&2; exit 2 ;;
  esac
done

for tool in dpkg-deb dpkg-shlibdeps help2man; do
  command -v "$tool" >/dev/null || { echo "package.sh: $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
if [ "$build" = 1 ]; then
  "$ROOT/scripts/build.sh"
fi
[ -f "$BUILD/CPackConfig.cmake" ] || { echo "package.sh: $BUILD is not a configured build tree" >&2; exit 1; }
# The man pages, completion and changelogs are ALL targets; make sure they are current.
cmake --build "$BUILD" --target flotilla_packaging_files >/dev/null

rm -rf "$BUILD/packages"
# CPack writes every file as root's (0/0) whoever builds them.
(cd "$BUILD" && cpack -G DEB --config CPackConfig.cmake >"$BUILD/cpack.log" 2>&1) ||
  { cat "$BUILD/cpack.log"; echo "package.sh: cpack failed" >&2; exit 1; }
ls -1 "$BUILD"/packages/*.deb
