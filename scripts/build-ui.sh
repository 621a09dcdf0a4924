#!/usr/bin/env bash
# Builds the dashboard (ui/) with Vite into OUT/dist and embeds it as
# OUT/ui_assets.cpp for flotilla-hub. The CMake build runs this when a file
# under ui/ changed (cmake/ui.cmake). Packages come from ui/package-lock.json
# (npm ci, only when ui/node_modules is missing or older than the lockfile,
# from npm's cache when it holds them: the lockfile's integrity hashes decide,
# so a machine without network builds from a warm cache); nothing is fetched
# at run time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: build-ui.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
. "$ROOT/scripts/node-env.sh"
cd "$ROOT/ui"
# Vite 8's bundler is a native package that npm skips without a word under an
# older Node.js (its engines): say so here rather than fail later in Vite.
if ! node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=19)?0:1)'; then
  echo "build-ui: node $(node --version) is older than 20.19, which the dashboard's build needs; run scripts/setup.sh (it installs Node.js 20 into .tools/node)" >&2
  exit 1
fi
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --prefer-offline --no-audit --no-fund --loglevel=error
fi
node_modules/.bin/vite build --outDir "$OUT/dist" --emptyOutDir --logLevel warn
node scripts/embed.mjs "$OUT/dist" "$OUT/ui_assets.cpp"
