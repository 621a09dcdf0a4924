#!/usr/bin/env bash
# The hub's /metrics, read by Prometheus's own parser: `promtool check
# metrics` must accept what a running hub exposes (after it has enrolled a
# device and run a campaign, so every family has samples), and must refuse
# a corrupted copy, which shows the check can fail.
# Exit 77 (skip) only when promtool is missing (scripts/fetch-promtool.sh).
set -euo pipefail
BIN="${FLOTILLA_BIN_DIR:?FLOTILLA_BIN_DIR must name build/bin}"
PROMTOOL="${FLOTILLA_PROMTOOL:-$(command -v promtool || true)}"
if [ -z "$PROMTOOL" ] || [ ! -x "$PROMTOOL" ]; then
  echo "SKIP: promtool not found; scripts/fetch-promtool.sh <dir> fetches it"
  exit 77
fi
WORK=$(mktemp -d)
chmod 0711 "$WORK"
HUB_PID=
cleanup() {
  [ -n "$HUB_PID" ] && kill "$HUB_PID" 2>/dev/null && wait "$HUB_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
"$BIN/flotilla-hub" --data-dir "$WORK/hub" --listen 127.0.0.1:0 >"$WORK/hub.log" 2>&1 &
HUB_PID=$!
for _ in $(seq 1 100); do
  [ -f "$WORK/hub/hub.url" ] && curl -fsS "$(cat "$WORK/hub/hub.url")/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
HUB=$(cat "$WORK/hub/hub.url")
AUTH="Authorization: Bearer $(cat "$WORK/hub/admin.token")"

# Some traffic, so counters and histograms carry samples: a bundle upload,
# a campaign the hub refuses (no device matches) and an unauthenticated call.
"$BIN/flotilla" key generate --out "$WORK/release" >/dev/null
mkdir -p "$WORK/spec"
printf 'node-label: metrics\n' >"$WORK/spec/10-m.yaml"
cat >"$WORK/spec/bundle.yaml" <<YAML
name: metrics
version: 1
expires-in: 1d
files:
  - kind: k3s-config
    source: 10-m.yaml
YAML
"$BIN/flotilla" bundle build "$WORK/spec" --out "$WORK/m.fbundle" >/dev/null
"$BIN/flotilla" bundle sign "$WORK/m.fbundle" --key "$WORK/release.key" >/dev/null
"$BIN/flotilla" bundle push "$WORK/m.fbundle" --hub "$HUB" --token-file "$WORK/hub/admin.token" -o json >"$WORK/push.json"
BID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$WORK/push.json")
code=$(curl -sS -o /dev/null -w '%{http_code}' -H "$AUTH" -H 'Content-Type: application/json' \
  -d "{\"bundle\":\"$BID\",\"selector\":\"env=none\"}" "$HUB/v1/campaigns")
[ "$code" = 400 ] || { echo "FAIL: a campaign matching no device answered $code, not 400"; exit 1; }
code=$(curl -sS -o /dev/null -w '%{http_code}' "$HUB/v1/devices")
[ "$code" = 401 ] || { echo "FAIL: no token answered $code, not 401"; exit 1; }

curl -fsS -H "$AUTH" "$HUB/metrics" >"$WORK/metrics.txt"
grep -q '^flotilla_' "$WORK/metrics.txt" || { echo "FAIL: no flotilla_ metrics"; cat "$WORK/metrics.txt"; exit 1; }
if ! "$PROMTOOL" check metrics <"$WORK/metrics.txt"; then
  echo "FAIL: promtool refused the hub's /metrics:"
  cat "$WORK/metrics.txt"
  exit 1
fi
# The same check refuses a broken exposition (a sample line with no value).
{ cat "$WORK/metrics.txt"; echo 'flotilla_broken_sample{a="b"}'; } >"$WORK/broken.txt"
if "$PROMTOOL" check metrics <"$WORK/broken.txt" >/dev/null 2>&1; then
  echo "FAIL: promtool accepted a corrupted exposition; the check proves nothing"
  exit 1
fi
echo "ok: promtool accepts the hub's /metrics ($(grep -vc '^#' "$WORK/metrics.txt") samples)"
