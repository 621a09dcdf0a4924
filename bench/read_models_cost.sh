#!/usr/bin/env bash
# bench/read_models_cost.sh — what the dashboard's read models (triggers and
# indexes of store/aggregate_store.cpp) add to the hub's hottest statement:
# the UPDATE that stores a device report (Store::save_device_state).
#
#   bench/read_models_cost.sh [--devices N] [--reports N]
#   bench/read_models_cost.sh --sim N      # the same at the hub level, below
#
# A store made by flotilla-hub itself (so the schema is the real one) is
# filled with N devices; the same sequence of reports (state changes through
# an apply, as an agent sends them, in transactions of 512 like the hub's
# report worker) is then timed twice on copies of it: with the read models,
# and with their triggers and indexes dropped. Prints microseconds per
# report. Python's sqlite3 module is the same SQLite (3.40) as the hub's.
#
# With --sim N: a whole campaign of N flotilla-sim devices (gateway mode)
# against the same flotilla-hub twice, once as built and once with the read
# models' triggers and indexes dropped from its store after its first start
# (the hub does not rebuild them: its schema version is current), printing
# the hub's CPU seconds and the campaign's convergence time for each.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${FLOTILLA_BIN_DIR:-$ROOT/build/bin}"
DEVICES=300000
REPORTS=300000
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) DEVICES="$2"; shift 2 ;;
    --reports) REPORTS="$2"; shift 2 ;;
    --sim) SIM="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
WORK="$(mktemp -d /tmp/flotilla-read-models-XXXXXX)"
chmod 0711 "$WORK"
trap 'rm -rf "$WORK"' EXIT
DROP_SQL="$(cat <<'SQL'
DROP TRIGGER IF EXISTS fleet_counts_insert; DROP TRIGGER IF EXISTS fleet_counts_delete;
DROP TRIGGER IF EXISTS fleet_counts_state; DROP TRIGGER IF EXISTS fleet_counts_reported;
DROP TRIGGER IF EXISTS fleet_counts_labels; DROP TRIGGER IF EXISTS device_trouble_update;
DROP TRIGGER IF EXISTS device_inventory_decommissioned; DROP TRIGGER IF EXISTS device_events_record;
DROP TRIGGER IF EXISTS directory_insert; DROP TRIGGER IF EXISTS directory_labels;
DROP TRIGGER IF EXISTS directory_delete; DROP TRIGGER IF EXISTS directory_decommission;
DROP INDEX IF EXISTS devices_hostname; DROP INDEX IF EXISTS devices_enrolled; DROP INDEX IF EXISTS devices_offline;
SQL
)"

if [ -n "${SIM:-}" ]; then
  run_hub() {  # name drop(0/1): prints "hub CPU s, converged s"
    local dir="$WORK/$1" pid
    mkdir -p "$dir"
    "$BIN/flotilla-hub" --data-dir "$dir/hub" --listen 127.0.0.1:0 >"$dir/hub.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do [ -f "$dir/hub/hub.url" ] && break; sleep 0.1; done
    kill "$pid"; wait "$pid" || true
    [ "$2" = 1 ] && python3 -c 'import sqlite3,sys; sqlite3.connect(sys.argv[1]).executescript(sys.argv[2])' "$dir/hub/hub.db" "$DROP_SQL"
    rm -f "$dir/hub/hub.url"
    "$BIN/flotilla-hub" --data-dir "$dir/hub" --listen 127.0.0.1:0 >>"$dir/hub.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do [ -f "$dir/hub/hub.url" ] && curl -fsS "$(cat "$dir/hub/hub.url")/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
    "$BIN/flotilla-sim" run --hub "$(cat "$dir/hub/hub.url")" --token-file "$dir/hub/admin.token" --devices "$SIM" \
      --mode gateway --seed 1 --label "cost-$1" --out "$dir/sim" --no-progress >"$dir/sim.log" 2>&1 || true
    local ticks
    ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill "$pid"; wait "$pid" || true
    python3 - "$dir/sim/report.json" "$ticks" "$(getconf CLK_TCK)" "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); f = r["figures"]
print(f"  {sys.argv[4]:22s} hub CPU {int(sys.argv[2]) / int(sys.argv[3]):6.1f} s, enrollment {f['enroll_s']:5.1f} s, "
      f"campaign converged {f['converged_s']:5.1f} s ({r['campaign']['end_state']})")
PY
  }
  echo "$SIM devices, one campaign, the same hub binary:"
  run_hub with-read-models 0
  run_hub without 1
  exit 0
fi
"$BIN/flotilla-hub" --data-dir "$WORK/hub" --listen 127.0.0.1:0 >"$WORK/hub.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do [ -f "$WORK/hub/hub.url" ] && break; sleep 0.1; done
kill "$pid"; wait "$pid" || true
python3 - "$WORK/hub/hub.db" "$DEVICES" "$REPORTS" <<'PY'
import json, random, shutil, sqlite3, sys, time
path, n, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
db = sqlite3.connect(path, isolation_level=None)
db.execute("PRAGMA cache_size=-65536")
random.seed(1)
ids = ["d-%020x" % random.getrandbits(80) for _ in range(n)]
db.execute("BEGIN")
for i, d in enumerate(ids):
    db.execute("INSERT INTO devices (id, project, labels, public_key, hostname, arch, agent_version, enrolled_ms, "
               "online, state, k3s_version) VALUES (?,?,?,?,?,?,?,?,1,'idle','v1.30.4+k3s1')",
               (d, "default", json.dumps({"env": "prod", "region": "r%d" % (i % 5)}), "ab" * 32, "host-%d" % i,
                "amd64", "0.2.0", i))
db.execute("COMMIT")
db.close()
shutil.copy(path, path + ".bare")
bare = sqlite3.connect(path + ".bare", isolation_level=None)
names = [r[0] for r in bare.execute(
    "SELECT name FROM sqlite_master WHERE type='trigger' AND (name LIKE 'fleet_counts_%' OR name LIKE 'directory_%'"
    " OR name IN ('device_events_record', 'device_inventory_decommissioned', 'device_trouble_update'))")]
for t in names: bare.execute("DROP TRIGGER " + t)
for i in ("devices_hostname", "devices_enrolled", "devices_offline"): bare.execute("DROP INDEX " + i)
bare.close()
upd = ("UPDATE devices SET last_seen_ms=?, online=?, state=?, applied_bundle=?, applied_version=?, k3s_version=?, "
       "node_ready=?, last_reason=?, last_message=?, last_seq=?, generation=?, desired_bundle_id=?, campaign_id=?, "
       "agent_version=?, arch=? WHERE id=? AND state != 'decommissioned'")
steps = ["verifying", "downloading", "staging", "installing", "restarting", "health_check", "applied"]
order = list(range(n)); random.shuffle(order)
def run(p):
    c = sqlite3.connect(p, isolation_level=None)
    c.execute("PRAGMA cache_size=-65536")
    seq = {}
    t = time.perf_counter()
    c.execute("BEGIN")
    for k in range(m):
        d = ids[order[(k // len(steps)) % n]]
        st = steps[k % len(steps)]
        fail = st == "applied" and (k // len(steps)) % 500 == 0
        seq[d] = seq.get(d, 0) + 1
        c.execute(upd, (k, 1, "failed" if fail else st, "" if st != "applied" or fail else "edge", 2 if st == "applied" else 0,
                        "v1.30.4+k3s1", 1, "install_failed" if fail else "", "", seq[d], 2, "b", "c", "0.2.0", "amd64", d))
        if k % 512 == 511:
            c.execute("COMMIT"); c.execute("BEGIN")
    c.execute("COMMIT")
    dt = time.perf_counter() - t
    c.close()
    return dt / m * 1e6
with_models = run(path)
without = run(path + ".bare")
print(f"{n} devices, {m} reports (an apply's {len(steps)} state changes per device, 1 in 500 failing)")
print(f"  report UPDATE without the read models: {without:6.1f} us")
print(f"  report UPDATE with the read models:    {with_models:6.1f} us  (+{100 * (with_models / without - 1):.0f}%)")
PY
