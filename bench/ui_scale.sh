#!/usr/bin/env bash
# bench/ui_scale.sh — the dashboard with a million devices in the hub's store
# (issue 19): how long the fleet page and filtered device lists take to show
# in a real browser (Debian's chromium, playwright-core), and what the API
# answers cost on their own.
#
#   bench/ui_scale.sh [--devices N] [--out DIR] [--keep]
#
# The fleet is flotilla-sim's (gateway mode, the real agent core, real batch
# enrollment through the hub's API) against a hub started here with its UI
# listener. The simulator's campaign has a 2% canary and an approval gate
# before the rest, so the store holds what a fleet in the middle of a rollout
# holds: most devices idle on their old state, the canary applied, a few
# failed (--install-fail), 1% offline (--offline). A sample of devices gets a
# rare label through the API (PATCH), for a selective label filter. The
# browser then loads each page afresh several times: the time from
# navigation to the figures shown (page load, sign-in check, the API answer
# and the render). Prints the figures; no pass/fail: this is a benchmark.
# Takes about 10 minutes at 1M on this 2-core machine (most of it enrollment).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEVICES=1000000
OUT=""
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) DEVICES="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
BIN="${FLOTILLA_BIN_DIR:-$ROOT/build/bin}"
. "$ROOT/scripts/node-env.sh"
CHROMIUM="${FLOTILLA_CHROMIUM:-/usr/bin/chromium}"
for b in flotilla-hub flotilla-sim; do
  [ -x "$BIN/$b" ] || { echo "no $BIN/$b: run scripts/build.sh first" >&2; exit 2; }
done
[ -x "$CHROMIUM" ] || { echo "no $CHROMIUM: run scripts/setup.sh" >&2; exit 2; }
[ -d "$ROOT/ui/node_modules/playwright-core" ] || { echo "no ui/node_modules: run scripts/setup.sh" >&2; exit 2; }
OUT="${OUT:-$(mktemp -d /tmp/flotilla-ui-scale-XXXXXX)}"
mkdir -p "$OUT"
chmod 0711 "$OUT"
HUB_PID= SIM_PID=
cleanup() {
  # wait returns the killed process's status: never let it end the cleanup.
  if [ -n "$SIM_PID" ]; then kill "$SIM_PID" 2>/dev/null || true; wait "$SIM_PID" 2>/dev/null || true; fi
  if [ -n "$HUB_PID" ]; then kill "$HUB_PID" 2>/dev/null || true; wait "$HUB_PID" 2>/dev/null || true; fi
  if [ "$KEEP" = 0 ]; then rm -rf "$OUT/hub"; fi
}
trap cleanup EXIT

echo "ui-scale: $DEVICES devices; output in $OUT"
# A store of 1M devices is larger than the page cache: map it (docs/operations.md).
"$BIN/flotilla-hub" --data-dir "$OUT/hub" --listen 127.0.0.1:0 --ui-listen 127.0.0.1:0 --db-mmap-mib 2048 \
  >"$OUT/hub.log" 2>&1 &
HUB_PID=$!
for _ in $(seq 1 300); do
  [ -f "$OUT/hub/ui.url" ] && curl -fsS "$(cat "$OUT/hub/hub.url")/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
HUB="$(cat "$OUT/hub/hub.url")"
UI="$(cat "$OUT/hub/ui.url")"
TOKEN="$(cat "$OUT/hub/admin.token")"
AUTH="Authorization: Bearer $TOKEN"

started=$(date +%s)
"$BIN/flotilla-sim" run --hub "$HUB" --token-file "$OUT/hub/admin.token" --devices "$DEVICES" --mode gateway \
  --devices-per-gateway 5000 --seed 1 --label ui-scale --install-fail 0.002 --offline 0.01 --timeout 90m \
  --strategy '{"canary": "2%", "waves": [100], "approval": ["wave 1"], "failure_threshold": {"percent": 50}}' \
  --out "$OUT/sim" --no-progress >"$OUT/sim.log" 2>&1 &
SIM_PID=$!
echo "ui-scale: enrolling and running the canary (flotilla-sim pid $SIM_PID)"
CAMPAIGN=
while :; do
  if ! kill -0 "$SIM_PID" 2>/dev/null; then echo "flotilla-sim ended early:"; tail -20 "$OUT/sim.log"; exit 1; fi
  CAMPAIGN="$(curl -fsS -H "$AUTH" "$HUB/v1/views/campaigns?state=waiting_approval" 2>/dev/null |
    python3 -c 'import json,sys; i=json.load(sys.stdin)["items"]; print(i[0]["id"] if i else "")' 2>/dev/null || true)"
  [ -n "$CAMPAIGN" ] && break
  sleep 5
done
echo "ui-scale: fleet in place after $(( $(date +%s) - started )) s; campaign $CAMPAIGN waits at its gate"

# A rare label on a sample of devices (through the API, as an operator would).
curl -fsS -H "$AUTH" "$HUB/v1/views/devices?limit=500&sort=enrolled" |
  python3 -c 'import json,sys; [print(d["id"]) for d in json.load(sys.stdin)["items"]]' >"$OUT/sample.ids"
while read -r id; do
  curl -fsS -o /dev/null -X PATCH -H "$AUTH" -H 'Content-Type: application/json' \
    -d '{"labels":{"tier":"lab"}}' "$HUB/v1/devices/$id"
done <"$OUT/sample.ids"
# A hostname prefix matching a few devices (flotilla-sim names its devices
# sim-<n>): sim-1234, sim-12340..12349, sim-123400..123499 at 1M.
HOST_PREFIX=sim-1234

UI_URL="$UI" HUB_URL="$HUB" ADMIN_TOKEN="$TOKEN" CAMPAIGN="$CAMPAIGN" HOST_PREFIX="$HOST_PREFIX" DEVICES="$DEVICES" \
  CHROMIUM="$CHROMIUM" OUT="$OUT" node "$ROOT/ui/e2e/ui_scale.mjs" | tee "$OUT/figures.txt"
echo "hub RSS now: $(awk '/VmRSS/ {print $2 / 1024 " MiB"}' "/proc/$HUB_PID/status"); store: $(du -sh "$OUT/hub/hub.db" | cut -f1)"
