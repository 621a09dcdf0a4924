#!/usr/bin/env bash
# The scale ladder (issue 5): virtual fleets of 1k, 10k, 100k and 1M devices
# against the real hub, gateway mode on every rung and direct mode as high as
# this machine allows, each next to the limit — a bare mosquitto round trip of
# the same messages — so the hub's efficiency is a ratio, not a time that
# depends on the machine. Writes docs/scale.md and its plots (docs/scale/).
#
#   bench/scale.sh                         # the whole ladder
#   bench/scale.sh --rungs "1000 10000"    # some rungs
#   bench/scale.sh --direct-max 5000       # highest direct-mode rung of the ladder
#   bench/scale.sh --direct-top 19000      # one more direct rung near the broker's 20,000 open files (0 = none)
#   bench/scale.sh --out DIR --report-only # regenerate docs/scale.md from DIR
#
# Needs a build (scripts/build.sh). Runs everything on loopback; each rung
# starts its own hub (flotilla-sim run without --hub).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${FLOTILLA_BIN_DIR:-$ROOT/build/bin}"
RUNGS="1000 10000 100000 1000000"
DIRECT_MAX=15000
DIRECT_TOP=19000
PER_GATEWAY=5000
OUT="${TMPDIR:-/tmp}/flotilla-scale-$$"
DOC="$ROOT/docs/scale.md"
while [ $# -gt 0 ]; do
  case "$1" in
    --rungs) RUNGS="$2"; shift 2 ;;
    --direct-max) DIRECT_MAX="$2"; shift 2 ;;
    --direct-top) DIRECT_TOP="$2"; shift 2 ;;
    --per-gateway) PER_GATEWAY="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --doc) DOC="$2"; shift 2 ;;
    --report-only) REPORT_ONLY=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
chmod 711 "$OUT"
SIM="$BIN/flotilla-sim"
[ -x "$SIM" ] || { echo "no $SIM: run scripts/build.sh first" >&2; exit 2; }

# shellcheck source=bench/lib/sim.sh
. "$ROOT/bench/lib/sim.sh"
run_rung() {  # mode devices
  local dir="$OUT/$1-$2"
  sim_rung "$dir" "$1" "$2" "$PER_GATEWAY"
  sim_baseline "$dir" "$1" "$2" "$PER_GATEWAY"
}

if [ -z "${REPORT_ONLY:-}" ]; then
  for n in $RUNGS; do
    run_rung gateway "$n"
    if [ "$n" -le "$DIRECT_MAX" ]; then run_rung direct "$n"; fi
  done
  if [ "$DIRECT_TOP" -gt 0 ]; then run_rung direct "$DIRECT_TOP"; fi
  "$SIM" footprint --devices 100000 >"$OUT/footprint.json"
fi

ALL_RUNGS=$(printf '%s\n' $RUNGS $([ "$DIRECT_TOP" -gt 0 ] && echo "$DIRECT_TOP") | sort -nu | tr '\n' ' ')
ROOT="$ROOT" python3 - "$OUT" "$DOC" "$ALL_RUNGS" "$(( DIRECT_TOP > DIRECT_MAX ? DIRECT_TOP : DIRECT_MAX ))" <<'PY'
import json, os, re, sys, datetime, subprocess
sys.path.insert(0, os.path.join(os.environ["ROOT"], "bench", "lib"))
from simreport import load, hub_latency, fmt
out, doc, rungs, direct_max = sys.argv[1], sys.argv[2], sys.argv[3].split(), int(sys.argv[4])
plots = os.path.join(os.path.dirname(doc), "scale")
os.makedirs(plots, exist_ok=True)
rows, images = [], []
for n in rungs:
    for mode in ("gateway", "direct"):
        if mode == "direct" and int(n) > direct_max: continue
        d = f"{out}/{mode}-{n}"
        if not os.path.exists(d): continue
        r = load(f"{d}/report.json"); b = load(f"{d}.baseline.json")
        if r is None:
            err = open(f"{d}.err").read()[-300:] if os.path.exists(f"{d}.err") else ""
            rows.append(f"| {mode} | {int(n):,} | did not finish: {err.strip().splitlines()[-1] if err.strip() else 'no report'} |" + " |" * 10)
            continue
        f, c = r["figures"], r["campaign"]
        counts = c.get("hub", {}).get("counts", {})
        conv = f.get("converged_s")
        ratio = None
        hub_tp = None
        if conv and b and b.get("complete"):
            msgs = int(n) * 6
            hub_tp = msgs / conv
            ratio = b["seconds"] / conv
        rss = f.get("hub_peak_rss_bytes") or 0
        hl = hub_latency(d, c.get("id")) or {}
        rows.append("| {} | {:,} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            mode, int(n), c.get("end_state"), f"{counts.get('applied', 0):,}", fmt(f.get("enroll_per_s"), "/s", 0),
            fmt(conv, " s"), fmt(hl.get("p50"), " s", 2), fmt(hl.get("p99"), " s", 2), fmt(hl.get("p999"), " s", 2),
            fmt(f.get("latency_p99_ms") and f["latency_p99_ms"] / 1000, " s", 2),
            f"{rss / (1 << 20):.0f} MiB ({rss / int(n):,.0f} B/dev)" if rss else "–",
            fmt(b and b.get("seconds"), " s", 2) if b else "–",
            fmt(ratio, "", 2)))
        html = open(f"{d}/report.html").read()
        svgs = re.findall(r"<svg.*?</svg>", html, re.S)
        names = ["states", "hub-counts", "latency-cdf", "hub-memory", "hub-cpu", "messages"]
        for name, svg in zip(names, svgs):
            fn = f"{mode}-{n}-{name}.svg"
            with open(os.path.join(plots, fn), "w") as fo: fo.write(svg)
        images.append((mode, n, names))
fp = load(f"{out}/footprint.json") or {}
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
with open(doc, "w") as o:
    o.write("# Scale results\n\n")
    o.write("Written by `bench/scale.sh` on {} ({} cores: {}). Every rung starts its own `flotilla-hub` (embedded "
            "mosquitto, SQLite) and one `flotilla-sim` process on the same machine; the simulator, the hub and the "
            "broker share the cores. See [simulator.md](simulator.md) for what a virtual device is.\n\n".format(
                datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"), os.cpu_count(), cpu))
    o.write("Converged: the hub's campaign left `running` and no virtual device is still between messages. "
            "**Hub p50/p99/p99.9**: per device, campaign creation to the hub *recording* the outcome "
            "(`campaign_devices.updated_ms` in the hub's SQLite). **Device p99**: campaign creation to the device "
            "*sending* its final report (the simulator's view; the gap to the hub's is the hub's report backlog). "
            "**Raw round trip**: "
            "`flotilla-sim baseline`, the same messages (one QoS 1 desired state out per device, five QoS 1 reports "
            "back) through a bare mosquitto with the same session layout. **Efficiency** = raw round trip time / "
            "hub convergence time (1.0 = the hub adds nothing to the broker's cost).\n\n")
    o.write("| mode | devices | end | applied | enroll rate | converged | hub p50 | hub p99 | hub p99.9 | device p99 | hub peak RSS | raw round trip | efficiency |\n")
    o.write("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    o.write("\n".join(rows) + "\n\n")
    if fp:
        o.write("Virtual device footprint (`flotilla-sim footprint --devices {devices}`: each device runs one full apply "
                "on the real agent core, no network): **{bpd:.0f} bytes per device** resident, {sb:.0f} bytes of it "
                "its encoded state; {aps:.0f} applies/s on one core.\n\n".format(
                    devices=fp.get("devices"), bpd=fp.get("bytes_per_device", 0), sb=fp.get("state_bytes_per_device", 0),
                    aps=fp.get("applies_per_s", 0)))
    for mode, n, names in images:
        o.write(f"## {mode} mode, {int(n):,} devices\n\n")
        for name in names:
            o.write(f"![{name}](scale/{mode}-{n}-{name}.svg)\n")
        o.write("\n")
print(f"wrote {doc}")
PY
echo "raw results in $OUT" >&2
