#!/usr/bin/env bash
# Builds the dashboard (ui/) with Vite into OUT/dist and embeds it as
# OUT/ui_assets.cpp for flotilla-hub. The CMake build runs this when a file
# under ui/ changed (cmake/ui.cmake). Packages come from ui/package-lock.json
# (npm ci, only when ui/node_modules is missing or older than the lockfile);
# nothing is fetched at run time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: build-ui.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
. "$ROOT/scripts/node-env.sh"
cd "$ROOT/ui"
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
node_modules/.bin/vite build --outDir "$OUT/dist" --emptyOutDir --logLevel warn
node scripts/embed.mjs "$OUT/dist" "$OUT/ui_assets.cpp"
