#!/usr/bin/env bash
# Builds only the static flotilla-agent for another architecture:
#
#   scripts/build-agent-cross.sh aarch64     -> build-aarch64/bin/flotilla-agent
#   scripts/build-agent-cross.sh armhf       -> build-armhf/bin/flotilla-agent
#
# Uses Debian's cross compilers (scripts/setup.sh installs them) and a sysroot
# of the target's -dev packages, unpacked from the Debian archive with a
# private apt state under build-<arch>/apt (the machine's own dpkg state is not
# touched; cmake/toolchains/debian-cross.cmake says why). Code generation uses
# the host protoc. OpenSSL is the same minimal static build the x86_64 agent
# links (scripts/build-openssl-min.sh, cross-compiled into
# build-<arch>/third_party/openssl-min), not Debian's full archive. Runs again
# incrementally. FLOTILLA_JOBS caps parallelism; FLOTILLA_OPENSSL_SRC_CACHE
# shares one OpenSSL source download between builds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCH="${1:-}"
case "$ARCH" in
  aarch64) DEB_ARCH=arm64; TRIPLET=aarch64-linux-gnu ;;
  armhf) DEB_ARCH=armhf; TRIPLET=arm-linux-gnueabihf ;;
  *) echo "usage: $0 aarch64|armhf" >&2; exit 2 ;;
esac
BUILD="${FLOTILLA_CROSS_BUILD_DIR:-$ROOT/build-$ARCH}"
JOBS="${FLOTILLA_JOBS:-$(nproc)}"
SYSROOT="$BUILD/sysroot"

"$ROOT/scripts/setup.sh"
command -v "$TRIPLET-g++" >/dev/null || { echo "$TRIPLET-g++ missing (scripts/setup.sh installs it)" >&2; exit 1; }

# The static archives and headers the agent links (edge-agent/CMakeLists.txt),
# the header-only libraries its sources include, and the runtime packages whose
# .so the -dev symlinks point at (CMake's find modules want them to resolve).
SYSROOT_PACKAGES=(
  libprotobuf-dev libprotobuf32 libprotobuf-lite32
  libpaho-mqtt-dev libpaho-mqtt1.3
  libssl-dev libssl3
  libsqlite3-dev libsqlite3-0
  libsodium-dev libsodium23
  libyaml-cpp-dev libyaml-cpp0.7
  libspdlog-dev libspdlog1.10 libfmt-dev libfmt9
  libboost1.74-dev nlohmann-json3-dev
)
stamp="$SYSROOT/.packages"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${SYSROOT_PACKAGES[*]}" ]; then
  echo "==> unpacking a $DEB_ARCH sysroot into $SYSROOT" >&2
  apt_dir="$BUILD/apt"
  rm -rf "$SYSROOT" "$apt_dir"
  mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs" "$SYSROOT"
  : >"$apt_dir/state/status"
  cat >"$apt_dir/sources.list" <<SRC
deb [arch=$DEB_ARCH] http://deb.debian.org/debian bookworm main
deb [arch=$DEB_ARCH] http://deb.debian.org/debian bookworm-updates main
deb [arch=$DEB_ARCH] http://deb.debian.org/debian-security bookworm-security main
SRC
  apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State=$apt_dir/state" -o "Dir::State::status=$apt_dir/state/status" -o "Dir::Cache=$apt_dir/cache"
    -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
    -o "APT::Architecture=$DEB_ARCH" -o "APT::Architectures::=$DEB_ARCH" -o Debug::NoLocking=1
    -o APT::Sandbox::User=root)
  # A repository whose index is mid-sync fails alone; the others' indexes are
  # kept and the download below says if a package is really missing.
  apt-get "${apt_opts[@]}" update -qq || echo "warning: some $DEB_ARCH indexes failed to update (see above)" >&2
  (cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" download -qq "${SYSROOT_PACKAGES[@]}")
  for deb in "$apt_dir"/debs/*.deb; do dpkg-deb -x "$deb" "$SYSROOT"; done
  echo "${SYSROOT_PACKAGES[*]}" >"$stamp"
fi

OPENSSL_MIN="$BUILD/third_party/openssl-min"
FLOTILLA_JOBS="$JOBS" "$ROOT/scripts/build-openssl-min.sh" "$OPENSSL_MIN" "$ARCH"

if [ ! -f "$BUILD/build.ninja" ] || ! grep -q "^FLOTILLA_WERROR:BOOL=ON\$" "$BUILD/CMakeCache.txt" ||
  ! grep -q "^FLOTILLA_AGENT_OPENSSL_ROOT:PATH=$OPENSSL_MIN\$" "$BUILD/CMakeCache.txt"; then
  FLOTILLA_CROSS_SYSROOT="$SYSROOT" cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_TOOLCHAIN_FILE="$ROOT/cmake/toolchains/$ARCH.cmake" -DFLOTILLA_AGENT_ONLY=ON -DFLOTILLA_WERROR=ON \
    "-DFLOTILLA_AGENT_OPENSSL_ROOT=$OPENSSL_MIN" >/dev/null
fi
FLOTILLA_CROSS_SYSROOT="$SYSROOT" cmake --build "$BUILD" --target flotilla-agent -j "$JOBS"
echo "$BUILD/bin/flotilla-agent"
