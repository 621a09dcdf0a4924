#!/usr/bin/env bash
# bench/campaign_rate.sh — does a campaign's rate limit hold? (issue 13)
#
#   bench/campaign_rate.sh [--devices N] [--rate PER_MINUTE] [--ramp START,FACTOR,EVERY] [--out DIR]
#
# Runs flotilla-sim (virtual devices on the real agent core, gateway mode,
# against a real flotilla-hub with its own mosquitto and SQLite) with a
# campaign strategy {"rate": {"max_per_minute": RATE, ...}}, then reads the
# hub's campaign counts the simulator sampled over time and prints the
# released-devices curve (devices released per 10 s and per minute) and the
# largest deviation of a full minute from the rate. Defaults: 2,000 devices
# at 600/min (about 3.5 minutes). No pass/fail: this is a benchmark.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEVICES=2000
RATE=600
RAMP=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) DEVICES="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    --ramp) RAMP="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
BIN="${FLOTILLA_BIN_DIR:-$ROOT/build/bin}"
if [ ! -x "$BIN/flotilla-sim" ]; then
  "$ROOT/scripts/setup.sh"
  "$ROOT/scripts/build.sh"
fi
STRATEGY="{\"rate\": {\"max_per_minute\": $RATE"
if [ -n "$RAMP" ]; then
  IFS=, read -r start factor every <<<"$RAMP"
  STRATEGY="$STRATEGY, \"start_per_minute\": $start, \"factor\": $factor, \"every_applied\": $every"
fi
STRATEGY="$STRATEGY}, \"device_deadline\": \"30m\"}"
OUT="${OUT:-$(mktemp -d /tmp/flotilla-campaign-rate-XXXXXX)}"
mkdir -p "$OUT"
minutes=$(( (DEVICES + RATE - 1) / RATE + 3 ))
echo "campaign-rate: $DEVICES devices, strategy $STRATEGY, report in $OUT"
"$BIN/flotilla-sim" run --devices "$DEVICES" --mode gateway --devices-per-gateway 500 --strategy "$STRATEGY" \
  --timeout "${minutes}m" --out "$OUT" --no-progress >"$OUT/sim.log" 2>&1 || {
  echo "flotilla-sim failed; its log ends:"; tail -20 "$OUT/sim.log"; exit 1; }
python3 - "$OUT/report.json" "$RATE" "$RAMP" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); rate = float(sys.argv[2]); ramp = sys.argv[3]
pts = [(p["t_ms"] / 1000.0, p["hub_counts"]) for p in r["timeline"] if "hub_counts" in p]
def released(c): return c.get("total", 0) - c.get("waiting", 0)
pts = [(t, released(c)) for t, c in pts]
# Start at the first release; end when the last device was released.
total = pts[-1][1]
t0 = next(t for t, n in pts if n > 0)
t1 = next(t for t, n in pts if n >= total)
def at(t):  # released devices at time t (step interpolation over the samples)
    n = 0
    for tt, nn in pts:
        if tt > t: break
        n = nn
    return n
print(f"released {total} devices in {t1 - t0:.1f} s: {60 * (total - 1) / max(t1 - t0, 1e-9):.1f}/min overall (limit {rate:.0f}/min)")
print("curve (seconds since the first release: devices released in the 10 s before)")
t = t0 + 10
while t < t1 + 10:
    n = at(t) - at(t - 10)
    print(f"  {t - t0:6.0f} s  {n:5d}  {'#' * int(round(n * 60 / max(rate, 1) ))}")
    t += 10
if not ramp:
    worst = 0.0
    m = t0
    while m + 60 <= t1:
        n = at(m + 60) - at(m)
        dev = abs(n - rate) / rate
        print(f"  minute from {m - t0:5.0f} s: {n} released ({100 * dev:.1f}% off)")
        worst = max(worst, dev)
        m += 60
    print(f"largest deviation of a full minute from {rate:.0f}/min: {100 * worst:.1f}%")
PY
