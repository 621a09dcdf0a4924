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
  # coordination on etcd (docs/adr/0014): the integration tests run a 3-member cluster
  etcd-server
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
  # the web dashboard (ui/): its build, and its browser tests in Debian's chromium
  nodejs npm chromium
)

missing=()
for p in "${PACKAGES[@]}"; do
  # Node.js from elsewhere (NodeSource's nodejs) brings its own npm: do not
  # ask apt for Debian's next to it.
  if [ "$p" = npm ] && command -v npm >/dev/null 2>&1; then continue; fi
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "setup: done" >&2
fi

# The dashboard's build (Vite) needs Node.js 20.19 or later; Debian 12 has 18.
# Then a Node.js 20 from the npm registry (the "node" package, which fetches
# its binary as another npm package) goes into .tools/node, and the build
# scripts put it first in PATH (scripts/node-env.sh).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE_PIN=20.20.2
node_new_enough() {
  "$1" -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=19)?0:1)' 2>/dev/null
}
if ! node_new_enough node && ! node_new_enough "$ROOT/.tools/node/node_modules/.bin/node"; then
  echo "setup: node $(node --version 2>/dev/null) is older than 20.19; installing Node.js $NODE_PIN into .tools/node" >&2
  npm install --prefix "$ROOT/.tools/node" --no-audit --no-fund --loglevel=error "node@$NODE_PIN" >/dev/null
fi
. "$ROOT/scripts/node-env.sh"

# The dashboard's packages (and playwright-core, the browser tests' driver),
# exactly as ui/package-lock.json pins them (checked against its integrity
# hashes, taken from npm's cache when it has them); again only when the
# lockfile changed. Only the npm registry is asked: no package in the lockfile
# has an install script (ui/test/lockfile.test.js keeps it so), and
# playwright-core never downloads a browser (the tests use Debian's chromium).
if [ ! -f "$ROOT/ui/node_modules/.package-lock.json" ] ||
  [ "$ROOT/ui/package-lock.json" -nt "$ROOT/ui/node_modules/.package-lock.json" ]; then
  echo "setup: npm ci in ui/" >&2
  (cd "$ROOT/ui" && npm ci --prefer-offline --no-audit --no-fund --loglevel=error >/dev/null)
fi
