#!/usr/bin/env bash
# Cells under load (issue 17): one hub process running 1, 2 and 4 cells (one
# embedded mosquitto, session, queue and report worker per cell), gateway
# mode at 100,000 and 1,000,000 devices, and direct mode across 4 cells with
# several simulator processes near 4 brokers' worth of sessions. Each rung
# has beside it the raw broker round trip of the same messages through bare
# mosquittos, one per cell, measured in the same run (efficiency = raw round
# trip / hub convergence). Each rung (run and baseline) holds the machine's
# CPU lock (bench/lib/sim.sh, with_cpu_lock). Prints a table and writes raw
# outputs to docs/scale/cells-<rung>.txt; docs/scale.md ("Cells") is
# written by hand from them.
#
#   bench/cells.sh                                  # everything below (hours)
#   bench/cells.sh --gateway "100000" --cells "1 2 4" --direct 0
#   bench/cells.sh --gateway "1000000" --cells "1 4" --direct 0
#   bench/cells.sh --gateway "" --direct 70000
#   bench/cells.sh --gateway "100000" --cells "4" --direct 0 --hub-db
#                      # every cell's device rows in hub.db, not in a file of
#                      # each cell's own (the hub's default for a new data
#                      # directory, ADR 18; --cell-files says it explicitly).
#                      # Raw outputs: docs/scale/cells-files-*.txt with files,
#                      # docs/scale/cells-*.txt without)
#   bench/cells.sh --out DIR --report-only          # the table again from DIR
#
# Needs a build (scripts/build.sh). Everything runs on loopback; each rung
# starts its own hub (flotilla-sim run without --hub, FLOTILLA_HUB_CELLS=N).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${FLOTILLA_BIN_DIR:-$ROOT/build/bin}"
GATEWAY="100000 1000000"
CELLS="1 2 4"
DIRECT=70000
DIRECT_CELLS=4
DIRECT_PROCESSES=0  # 0: as bench/lib/sim.sh sizes them (15,000 sessions each)
PER_GATEWAY=5000
OUT="${TMPDIR:-/tmp}/flotilla-cells-$$"
RAW="$ROOT/docs/scale"
FILES=true
while [ $# -gt 0 ]; do
  case "$1" in
    --gateway) GATEWAY="$2"; shift 2 ;;
    --cells) CELLS="$2"; shift 2 ;;
    --direct) DIRECT="$2"; shift 2 ;;
    --direct-cells) DIRECT_CELLS="$2"; shift 2 ;;
    --direct-processes) DIRECT_PROCESSES="$2"; shift 2 ;;
    --per-gateway) PER_GATEWAY="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --raw) RAW="$2"; shift 2 ;;
    --report-only) REPORT_ONLY=1; shift ;;
    --cell-files) FILES=true; shift ;;
    --hub-db) FILES=false; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
export FLOTILLA_HUB_CELL_FILES="$FILES"
mkdir -p "$OUT" "$RAW"
chmod 711 "$OUT"
[ -x "$BIN/flotilla-sim" ] || { echo "no $BIN/flotilla-sim: run scripts/build.sh first" >&2; exit 2; }
# shellcheck source=bench/lib/sim.sh
. "$ROOT/bench/lib/sim.sh"

# CPU seconds and RSS of the hub, its mosquittos and the simulators every
# 5 s while a rung runs (DIR.ps): where the time went, per process; and the
# size of each SQLite write-ahead log under DIR ("wal BYTES PATH"): a log
# that keeps growing means a reader holds an old snapshot and checkpoints
# cannot start it over.
sample_processes() {  # DIR
  while :; do
    echo "# $(date +%s)"
    ps -eo pid,ppid,comm,times,rss --no-headers | awk '$3 ~ /^(flotilla-hub|mosquitto|flotilla-sim)$/'
    find "$1" -name '*.db-wal' -printf 'wal %s %P\n' 2>/dev/null || true
    sleep 5
  done >"$1.ps"
}

rung() {  # mode cells devices [flotilla-sim run flags]
  local mode="$1" cells="$2" n="$3"
  shift 3
  local dir="$OUT/$mode-$cells-$n"
  sample_processes "$dir" &
  local sampler=$!
  FLOTILLA_HUB_CELLS="$cells" sim_rung "$dir" "$mode" "$n" "$PER_GATEWAY" "$@"
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  sim_baseline "$dir" "$mode" "$n" "$PER_GATEWAY" "$cells"
  rm -rf "$dir"-baseline*/ "$dir/tls"
}

if [ -z "${REPORT_ONLY:-}" ]; then
  for n in $GATEWAY; do
    for c in $CELLS; do with_cpu_lock rung gateway "$c" "$n"; done
  done
  if [ "$DIRECT" -gt 0 ]; then
    if [ "$DIRECT_PROCESSES" -gt 0 ]; then
      with_cpu_lock rung direct "$DIRECT_CELLS" "$DIRECT" --processes "$DIRECT_PROCESSES"
    else
      with_cpu_lock rung direct "$DIRECT_CELLS" "$DIRECT"
    fi
  fi
fi

ROOT="$ROOT" python3 - "$OUT" "$RAW" <<'PY'
import glob, json, os, re, sys
sys.path.insert(0, os.path.join(os.environ["ROOT"], "bench", "lib"))
from simreport import load, hub_latency, fmt
out, raw = sys.argv[1], sys.argv[2]

def last_ps(path):
    """CPU seconds and peak RSS per process kind from the last sample of DIR.ps."""
    try:
        text = open(path).read()
    except Exception:
        return {}
    samples = [s for s in text.split("# ") if s.strip()]
    peak, cpu = {}, {}
    for s in samples:
        now = {}
        for line in s.splitlines()[1:]:
            f = line.split()
            if len(f) < 5: continue
            kind = f[2]
            now.setdefault(kind, [0, 0])
            now[kind][0] += int(f[3]); now[kind][1] += int(f[4])
        for k, (c, r) in now.items():
            cpu[k] = max(cpu.get(k, 0), c)
            peak[k] = max(peak.get(k, 0), r)
    return {k: {"cpu_s": cpu[k], "peak_rss_kib": peak[k]} for k in cpu}

rows = []
key = lambda d: (os.path.basename(d).split("-")[0] != "gateway", int(os.path.basename(d).split("-")[2]),
                 int(os.path.basename(d).split("-")[1]))
for d in sorted((p for p in glob.glob(f"{out}/*-*-*") if os.path.isdir(p) and re.search(r"/(gateway|direct)-\d+-\d+$", p)), key=key):
    name = os.path.basename(d)
    mode, cells, n = name.split("-")[0], int(name.split("-")[1]), int(name.split("-")[2])
    r, b = load(f"{d}/report.json"), load(f"{d}.baseline.json")
    ps = last_ps(f"{d}.ps")
    row = {"rung": name, "mode": mode, "cells": cells, "devices": n}
    if r is None:
        err = open(f"{d}.err").read().strip().splitlines() if os.path.exists(f"{d}.err") else []
        row["error"] = err[-1] if err else "no report"
    else:
        f, c = r["figures"], r["campaign"]
        conv = f.get("converged_s")
        hl = hub_latency(d, c.get("id")) or {}
        # The campaign's messages as the baseline counts them: one desired
        # state and five reports per device (gateways carry reports gathered).
        msgs = n * 6
        row.update({
            "end": c.get("end_state"), "applied": c.get("hub", {}).get("counts", {}).get("applied"),
            "enroll_s": f.get("enroll_s"), "converged_s": conv, "hub_p50_s": hl.get("p50"), "hub_p99_s": hl.get("p99"),
            "device_p99_s": f.get("latency_p99_ms") and f["latency_p99_ms"] / 1000,
            "messages": msgs, "messages_per_s": msgs / conv if conv else None, "peak_messages_per_s": f.get("peak_msgs_per_s"),
            "hub_cpu_s": f.get("hub_cpu_s"), "hub_peak_rss_bytes": f.get("hub_peak_rss_bytes"),
            "hub_peak_rss_anon_bytes": f.get("hub_peak_rss_anon_bytes"), "sim_cpu_s": f.get("sim_cpu_s"),
            "mosquitto_cpu_s": ps.get("mosquitto", {}).get("cpu_s"),
            "mosquitto_peak_rss_kib": ps.get("mosquitto", {}).get("peak_rss_kib"),
            "reconnects": f.get("reconnects"), "publish_errors": f.get("publish_errors")})
    if b:
        row["baseline_s"] = b.get("seconds") if b.get("complete") else None
        row["baseline_brokers"] = b.get("brokers", 1)
        if row.get("converged_s") and row["baseline_s"]:
            row["efficiency"] = row["baseline_s"] / row["converged_s"]
    rows.append(row)
    files = os.environ.get("FLOTILLA_HUB_CELL_FILES") == "true"
    row["cell_files"] = files
    with open(os.path.join(raw, f"cells-{'files-' if files else ''}{name}.txt"), "w") as o:
        o.write(f"# bench/cells.sh rung {name}: figures, then the simulator's output, /usr/bin/time -v, the baseline\n")
        o.write(json.dumps(row, indent=1) + "\n\n## flotilla-sim stdout\n")
        for suffix, title in ((".out", None), (".time", "/usr/bin/time -v (flotilla-sim and everything it started)"),
                              (".baseline.json", "baseline"), (".err", "flotilla-sim stderr (last 40 lines)")):
            p = d + suffix
            if not os.path.exists(p): continue
            text = open(p).read()
            if suffix == ".err": text = "\n".join(text.splitlines()[-40:]) + "\n"
            if suffix == ".baseline.json":
                j = load(p) or {}
                j.pop("parts", None)
                text = json.dumps(j) + "\n"
            if title: o.write(f"\n## {title}\n")
            o.write(text)
        if ps:
            o.write("\n## CPU seconds and peak RSS per process kind (ps, every 5 s)\n" + json.dumps(ps) + "\n")

print("| mode | cells | devices | end | applied | enroll | converged | hub p50 | hub p99 | device p99 | msgs/s (campaign / sim peak) "
      "| hub CPU | hub RSS (anon) | mosquitto CPU | raw round trip | efficiency |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if "error" in r:
        print(f"| {r['mode']} | {r['cells']} | {r['devices']:,} | did not finish: {r['error']} |" + " |" * 12)
        continue
    rss = r.get("hub_peak_rss_anon_bytes") or r.get("hub_peak_rss_bytes")
    print("| {} | {} | {:,} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} |".format(
        r["mode"], r["cells"], r["devices"], r.get("end"), f"{r['applied']:,}" if r.get("applied") is not None else "–",
        fmt(r.get("enroll_s"), " s"), fmt(r.get("converged_s"), " s"), fmt(r.get("hub_p50_s"), " s"),
        fmt(r.get("hub_p99_s"), " s"), fmt(r.get("device_p99_s"), " s"),
        f"{r['messages_per_s']:,.0f}" if r.get("messages_per_s") else "–",
        f"{r['peak_messages_per_s']:,.0f}" if r.get("peak_messages_per_s") else "–",
        fmt(r.get("hub_cpu_s"), " s", 0), f"{rss / 1e6:.0f} MB" if rss else "–",
        fmt(r.get("mosquitto_cpu_s"), " s") if r.get("mosquitto_cpu_s") is not None else "–",
        fmt(r.get("baseline_s"), " s") + (f" ({r['baseline_brokers']} brokers)" if r.get("baseline_brokers", 1) > 1 else ""),
        fmt(r.get("efficiency"), "", 2)))
PY
echo "raw results in $OUT; per rung in $RAW/cells-*.txt" >&2
