#!/usr/bin/env bash
# Puts Prometheus's promtool at <dir>/promtool, for checking /metrics with the
# real exposition-format parser. Uses promtool from PATH when installed;
# otherwise extracts it from Debian's prometheus package without installing
# the package (no daemon, no service). Quick when already there.
set -euo pipefail
DEST="${1:?usage: scripts/fetch-promtool.sh <dir>}"
mkdir -p "$DEST"
[ -x "$DEST/promtool" ] && exit 0
if command -v promtool >/dev/null 2>&1; then
  ln -sf "$(command -v promtool)" "$DEST/promtool"
  exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "fetch-promtool: downloading Debian's prometheus package for promtool" >&2
if ! (cd "$TMP" && apt-get download prometheus >/dev/null 2>&1); then
  echo "fetch-promtool: could not download the prometheus package (apt-get download prometheus)" >&2
  exit 1
fi
dpkg-deb -x "$TMP"/prometheus_*.deb "$TMP/x"
install -m 0755 "$TMP/x/usr/bin/promtool" "$DEST/promtool"
echo "fetch-promtool: $DEST/promtool" >&2
