# Sourced by the scripts that run Node.js for the dashboard (build-ui.sh,
# tests/e2e/ui_browser.sh, bench/ui_scale.sh): puts the Node.js that
# scripts/setup.sh installed into .tools/node first in PATH when Debian's is
# too old for the frontend's build (Debian 12 ships 18; Vite needs 20.19+).
FLOTILLA_ROOT="${FLOTILLA_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
if [ -x "$FLOTILLA_ROOT/.tools/node/node_modules/.bin/node" ]; then
  PATH="$FLOTILLA_ROOT/.tools/node/node_modules/.bin:$PATH"
  export PATH
fi
