#!/usr/bin/env bash
# Installs exactly the Debian 12 packages Flotilla needs to build, test and run
# the demo. Idempotent and quick when everything is present.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config
  # dpkg-source unpacks Debian's openssl source (scripts/build-openssl-min.sh)
  dpkg-dev
  protobuf-compiler libprotobuf-dev
  libsodium-dev libsqlite3-dev
  libspdlog-dev libfmt-dev
  libboost-dev
  libpaho-mqtt-dev
  nlohmann-json3-dev libyaml-cpp-dev libssl-dev openssl
  # Git sync in the hub (libgit2); the git CLI makes the test repositories
  libgit2-dev git
  catch2
  mosquitto mosquitto-clients
  curl
  # images/: ext4 and archives without mounting; the image tests' tools
  libext2fs-dev e2fsprogs libarchive-dev fdisk zstd
  # cross-built static agents (scripts/build-agent-cross.sh) and running them
  gcc-aarch64-linux-gnu g++-aarch64-linux-gnu gcc-arm-linux-gnueabihf g++-arm-linux-gnueabihf
  qemu-user-static
  # Debian packages (scripts/package.sh): man pages from --help, and the
  # packaging test's lintian
  help2man lintian
  # libFuzzer targets (tests/fuzz/run.sh, run by scripts/test.sh)
  clang-14 libclang-rt-14-dev
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

echo "setup: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done" >&2
