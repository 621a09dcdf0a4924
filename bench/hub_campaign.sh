#!/usr/bin/env bash
# bench/hub_campaign.sh — the hub's campaign figures at 10k devices (issue 4):
# convergence time of one campaign and the hub's memory per device.
#
#   bench/hub_campaign.sh [--devices N] [--mode gateway|direct] [--out DIR]
#
# The load is flotilla-sim: virtual devices running the real agent core
# against a real flotilla-hub with its own mosquitto and SQLite (gateway mode
# by default: 5,000 devices per MQTT session; direct mode opens one session
# per device and enrolls far slower). Prints the figures; the full report
# (JSON + HTML with plots) stays in DIR. No pass/fail: this is a benchmark.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEVICES=10000
MODE=gateway
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) DEVICES="$2"; shift 2 ;;
    --mode) MODE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
BIN="${FLOTILLA_BIN_DIR:-$ROOT/build/bin}"
if [ ! -x "$BIN/flotilla-sim" ]; then
  "$ROOT/scripts/setup.sh"
  "$ROOT/scripts/build.sh"
fi
OUT="${OUT:-$(mktemp -d /tmp/flotilla-hub-campaign-XXXXXX)}"
mkdir -p "$OUT"
echo "hub-campaign: $DEVICES devices, $MODE mode, report in $OUT"
"$BIN/flotilla-sim" run --devices "$DEVICES" --mode "$MODE" --out "$OUT" --no-progress >"$OUT/sim.log" 2>&1 || {
  echo "flotilla-sim failed; its log ends:"; tail -20 "$OUT/sim.log"; exit 1; }
python3 - "$OUT/report.json" "$DEVICES" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); f = r["figures"]; n = int(sys.argv[2])
def s(v): return "n/a" if v is None else f"{v:.1f} s"
print(f"devices                     {n}")
print(f"enrollment                  {f['enroll_s']:.1f} s ({f['enroll_per_s']:.0f}/s)")
print(f"campaign converged          {s(f['converged_s'])} after creation (end state: {r['campaign']['end_state']})")
print(f"per-device latency          p50 {f['latency_p50_ms']/1000:.2f} s, p99 {f['latency_p99_ms']/1000:.2f} s, p99.9 {f['latency_p999_ms']/1000:.2f} s")
print(f"hub peak RSS                {f['hub_peak_rss_bytes']/2**20:.1f} MiB = {f['hub_peak_rss_bytes']/n/1024:.2f} KiB per device")
print(f"hub CPU                     {f['hub_cpu_s']:.1f} s")
print(f"peak messages per second    {f['peak_msgs_per_s']:.0f}")
PY
