#!/usr/bin/env bash
# Federation overhead on reads: R regional hubs over TLS (each its own CA),
# N simulated devices enrolled in each by flotilla-sim (which also runs its
# own campaign there), then the same paged device list read directly from
# every region and through a federation in front of them. Prints the time of
# each and the overhead ratio (federation / sum of direct). Asserts nothing.
# Small by default; take the shared CPU lock around it on a shared machine.
#
# Campaign mode (4th argument "campaign"): the simulators only serve their
# devices (flotilla-sim --serve-only, gateway mode); one campaign (bundle v1)
# is created directly in every region at once and timed until the last region
# completes, then the next bundle (v2) goes through the federation as one
# group of all regions, timed until the federated campaign completes. Prints
# both convergence times and the overhead ratio (federation / direct).
#
# Rollout mode (4th argument "rollout"; issue 18's 1M run is 4 250000
# rollout): the same serve-only regions, then one federated campaign region by
# region (r1, then r2, ...; no soak). Each regional campaign is also watched
# directly at its region; its own time is read from the region's SQLite
# (creation to the last device outcome). The script prints the federation's
# total against the sum of the regions' own times, each hub's per-device
# latency (p50/p99), the latencies of its own requests (the federated
# campaign, a fan-out device page every 5 s, the regional campaigns), the CPU
# and peak memory of every hub, broker, simulator and the federation, and
# whether the counts are exact (every device applied, each region's share
# the region's own count). Exits 1 if they are not. A long run at full CPU:
# take the shared lock around it.
#
#   bench/federation.sh [build-dir] [regions] [devices-per-region] [pages|campaign|rollout]
set -euo pipefail
BUILD=${1:-$(cd "$(dirname "$0")/.." && pwd)/build}
REGIONS=${2:-2}
DEVICES=${3:-500}
PAGES=${4:-20}
MODE=reads
if [[ $PAGES == campaign || $PAGES == rollout ]]; then MODE=$PAGES; PAGES=0; fi
SERVE=false  # the simulators only serve; campaigns come from this script
[[ $MODE != reads ]] && SERVE=true
# Above 100,000 devices a region maps its store, as bench/scale.sh does.
HUB_STORE=()
[[ $DEVICES -gt 100000 ]] && HUB_STORE=(--db-mmap-mib 2048)
BIN=$BUILD/bin
for b in flotilla-hub flotilla-sim flotilla; do [[ -x $BIN/$b ]] || { echo "missing $BIN/$b" >&2; exit 2; }; done
TMP=$(mktemp -d /tmp/flotilla-federation-bench-XXXXXX)
chmod 711 "$TMP"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # FLOTILLA_BENCH_KEEP=1 keeps the hubs' logs and stores for a look after.
  if [[ ${FLOTILLA_BENCH_KEEP:-0} == 1 ]]; then echo "kept: $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
T_SCRIPT=$(date +%s%3N)
wait_for() { local t=$1; shift; for _ in $(seq $((t * 10))); do "$@" && return 0; sleep 0.1; done; return 1; }
now_ms() { date +%s%3N; }

start_hub() {  # dir extra-args...
  local dir=$1; shift
  mkdir -p "$dir"; chmod 711 "$dir"
  "$BIN/flotilla-hub" --data-dir "$dir" --listen 127.0.0.1:0 --config "" --enroll-rate 0 --enroll-rate-per-token 0 \
    --http-max-connections-per-peer 0 "$@" >"$dir.log" 2>&1 &
  PIDS+=($!)
  wait_for 30 test -s "$dir/hub.url"
}

declare -a URLS CAS TOKENS HUB_PIDS SIM_PIDS
if $SERVE; then
  # One release key every simulated device pins; bundles v1 (direct) and v2
  # (through the federation) signed with it.
  ROOT_KEY=$("$BIN/flotilla" key generate --out "$TMP/release" | sed -n 's/^public key: *//p')
  for v in 1 2; do
    mkdir -p "$TMP/b$v"; cp -r "$(dirname "$0")/../bundles/examples/demo/." "$TMP/b$v/"
    sed -i "s/^version: .*/version: $v/" "$TMP/b$v/bundle.yaml"
    "$BIN/flotilla" bundle build "$TMP/b$v" --out "$TMP/b$v.fbundle" >/dev/null
    "$BIN/flotilla" bundle sign "$TMP/b$v.fbundle" --key "$TMP/release.key" >/dev/null
  done
fi
for i in $(seq 1 "$REGIONS"); do
  d=$TMP/r$i
  mkdir -p "$d.pki"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$d.pki/ca.key" -out "$d.pki/ca.pem" \
    -days 1 -subj "/CN=bench CA r$i" -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$d.pki/ext.cnf"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$d.pki/hub.key" -out "$d.pki/hub.csr" \
    -subj "/CN=r$i" 2>/dev/null
  openssl x509 -req -in "$d.pki/hub.csr" -CA "$d.pki/ca.pem" -CAkey "$d.pki/ca.key" -CAcreateserial -out "$d.pki/hub.pem" \
    -days 1 -extfile "$d.pki/ext.cnf" 2>/dev/null
  start_hub "$d" --tls-cert "$d.pki/hub.pem" --tls-key "$d.pki/hub.key" "${HUB_STORE[@]}"
  HUB_PIDS[$i]=${PIDS[-1]}
  URLS[$i]=$(head -1 "$d/hub.url")
  CAS[$i]=$d.pki/ca.pem
  wait_for 30 curl -fs --cacert "${CAS[$i]}" "${URLS[$i]}/readyz" -o /dev/null
  ADMIN=$(head -1 "$d/admin.token")
  TOKENS[$i]=$(curl -fsS --cacert "${CAS[$i]}" -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
    -d '{"name":"federation","role":"operator","project":"*"}' "${URLS[$i]}/v1/tokens" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  printf '%s\n' "${TOKENS[$i]}" >"$d.op.token"
  if $SERVE; then
    # The simulator enrolls and serves the devices; campaigns come from here.
    SSL_CERT_FILE=${CAS[$i]} "$BIN/flotilla-sim" run --serve-only --hub "${URLS[$i]}" --token-file "$d.op.token" \
      --devices "$DEVICES" --devices-per-gateway 5000 --enroll-threads 4 --seed "$i" --label fedbench \
      --root-key "$ROOT_KEY" --out "$d.sim" --no-progress >"$d.sim.log" 2>&1 &
    PIDS+=($!)
    SIM_PIDS[$i]=$!
    [[ $i == 1 ]] && t_enroll=$(now_ms)
  else
    # The simulator enrolls the devices (and runs its own campaign) at this region.
    SSL_CERT_FILE=${CAS[$i]} "$BIN/flotilla-sim" run --hub "${URLS[$i]}" --token-file "$d.op.token" \
      --devices "$DEVICES" --devices-per-gateway 1000 --seed "$i" --out "$d.sim" --no-progress --timeout 300s >/dev/null
  fi
done
if $SERVE; then
  for i in $(seq 1 "$REGIONS"); do
    wait_for 3600 test -s "$TMP/r$i.sim/serving.json" || { echo "region r$i: simulator not serving" >&2; tail -5 "$TMP/r$i.sim.log" >&2; exit 1; }
  done
  echo "enrolled and online: $REGIONS x $DEVICES devices in $(( $(now_ms) - t_enroll )) ms (first simulator started -> every simulator serving; the regions enroll in parallel)"
fi

start_hub "$TMP/fed" --role federation
FED_PID=${PIDS[-1]}
FED=$(head -1 "$TMP/fed/hub.url")
FADMIN=$(head -1 "$TMP/fed/admin.token")
wait_for 30 curl -fs "$FED/readyz" -o /dev/null
for i in $(seq 1 "$REGIONS"); do
  python3 - "$i" "${URLS[$i]}" "${CAS[$i]}" "${TOKENS[$i]}" >"$TMP/region.json" <<'PY'
import json, sys
print(json.dumps({"name": "r" + sys.argv[1], "url": sys.argv[2], "ca_pem": open(sys.argv[3]).read(), "token": sys.argv[4]}))
PY
  curl -fsS -H "Authorization: Bearer $FADMIN" -H 'Content-Type: application/json' --data @"$TMP/region.json" \
    "$FED/v1/regions" -o /dev/null
done

if [[ $MODE == rollout ]]; then
  echo "regions, simulators and federation up: $(( ($(now_ms) - T_SCRIPT) / 1000 )) s after the start"
  fbid=$(curl -fsS -H "Authorization: Bearer $FADMIN" -H 'Content-Type: application/octet-stream' \
    --data-binary @"$TMP/b1.fbundle" "$FED/v1/bundles" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  python3 - "$TMP/rollout.json" <<PY
import json
regions = []
for i, (url, ca, tok, hub, sim) in enumerate(zip("${URLS[*]}".split(), "${CAS[*]}".split(), "${TOKENS[*]}".split(),
                                                 "${HUB_PIDS[*]}".split(), "${SIM_PIDS[*]}".split()), 1):
    regions.append({"name": "r%d" % i, "url": url, "ca": ca, "token": tok, "hub_pid": int(hub), "sim_pid": int(sim),
                    "db": "$TMP/r%d/hub.db" % i})
json.dump({"federation": "$FED", "admin": "$FADMIN", "fed_pid": $FED_PID, "bundle": "$fbid", "devices": $DEVICES,
           "lib": "$(cd "$(dirname "$0")" && pwd)/lib", "regions": regions}, open("$TMP/rollout.json", "w"))
PY
  rc=0
  python3 - "$TMP/rollout.json" <<'PY' || rc=$?
# One federated campaign region by region, watched at the federation and at
# each region; prints the figures and exits 1 unless the counts are exact.
import json, os, ssl, sys, time, urllib.request

cfg = json.load(open(sys.argv[1]))
sys.path.insert(0, cfg["lib"])
from simreport import hub_latency
N = cfg["devices"]
TICK = os.sysconf("SC_CLK_TCK")
LAT = {}   # kind -> latencies (ms) of the requests this script made
ERRS = {}  # kind -> failed requests (retried; the run goes on)

def call(kind, base, token, path, body=None, ca=None, tries=5):
    # GETs are retried: a long run must not die of one slow answer under
    # load; every failure is counted and printed. POSTs are not retried.
    ctx = ssl.create_default_context(cafile=ca) if ca else None
    req = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    for attempt in range(tries if body is None else 1):
        t = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
                out = json.load(r)
            LAT.setdefault(kind, []).append((time.monotonic() - t) * 1000)
            return out
        except Exception as e:
            ERRS[kind] = ERRS.get(kind, 0) + 1
            print("%s: %s (attempt %d)" % (kind, e, attempt + 1), file=sys.stderr, flush=True)
            if body is not None or attempt + 1 == tries:
                raise
            time.sleep(1)

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]

def now_ms():
    return time.monotonic_ns() // 1_000_000

def children(pid):
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                st = open("/proc/%s/stat" % p).read()
            except OSError:
                continue
            if int(st[st.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(p))
    return out

def cpu_s(pid):
    st = open("/proc/%d/stat" % pid).read()
    f = st[st.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / TICK

def mem_mb(pid, key):
    for line in open("/proc/%d/status" % pid):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0

procs = [("federation", cfg["fed_pid"])]
for r in cfg["regions"]:
    procs.append(("hub " + r["name"], r["hub_pid"]))
    for c in children(r["hub_pid"]):
        procs.append(("broker " + r["name"], c))
    procs.append(("sim " + r["name"], r["sim_pid"]))
cpu0 = {pid: cpu_s(pid) for _, pid in procs}

names = [r["name"] for r in cfg["regions"]]
by_name = {r["name"]: r for r in cfg["regions"]}
t0 = now_ms()
c = call("federation POST /v1/campaigns", cfg["federation"], cfg["admin"], "/v1/campaigns",
         {"bundle": cfg["bundle"], "selector": "sim-run=fedbench", "name": "rollout", "regions": names})
fid = c["id"]
started, done, direct = {}, {}, {}
deadline = time.monotonic() + 3 * 3600
next_page = 0.0
while True:
    if time.monotonic() >= next_page:
        # A fan-out read (a page of devices from every region) every 5 s,
        # timed like any operator's read during the rollout.
        pg = call("federation GET /v1/devices?limit=100 (fan-out)", cfg["federation"], cfg["admin"],
                  "/v1/devices?limit=100")
        bad = [x["region"] for x in pg.get("regions", []) if x.get("state") != "ok"]
        if bad:
            print("device page: regions not ok: %s" % bad, file=sys.stderr, flush=True)
        next_page = time.monotonic() + 5
    c = call("federation GET /v1/campaigns/{id}", cfg["federation"], cfg["admin"], "/v1/campaigns/" + fid)
    t = now_ms()
    for p in c["regions"]:
        if p["regional_campaign"] and p["region"] not in started:
            started[p["region"]] = (t, p["regional_campaign"])
    for name, (ts, rid) in started.items():
        if name in done:
            continue
        r = by_name[name]
        x = call("region GET /v1/campaigns/{id} (direct)", r["url"], r["token"], "/v1/campaigns/" + rid, ca=r["ca"])
        if x["state"] == "completed":
            done[name] = now_ms()
            direct[name] = x["counts"]
            print("region %s: regional campaign %s seen completed, %d/%d applied, %d failed, %d ms after the "
                  "federation first showed it" % (name, rid, x["counts"]["applied"], x["counts"]["total"],
                                                  x["counts"]["failed"], done[name] - ts), flush=True)
            if x["counts"]["applied"] != N:
                print("region %s: counts %s" % (name, json.dumps(x["counts"], sort_keys=True)), flush=True)
    if c["state"] == "completed":
        t_end = now_ms()
        break
    if c["state"] in ("stopped", "aborted", "paused") or time.monotonic() > deadline:
        print("federated campaign ended %s: %s" % (c["state"], c.get("state_reason", "")), file=sys.stderr)
        sys.exit(1)
    time.sleep(0.5)
cpu1 = {pid: cpu_s(pid) for _, pid in procs}
total_ms = t_end - t0
# Each region's own time from its own store: the regional campaign's
# creation to the last device outcome it recorded (the federation may learn
# of a regional campaign late when creating it outlasts its region timeout).
lat = {n: hub_latency(None, started[n][1], db_path=by_name[n]["db"]) or {} for n in names}
own = sum(int(lat[n].get("max", 0) * 1000) for n in names)
print("regions=%d devices_per_region=%d devices=%d" % (len(names), N, N * len(names)))
print("federation: one campaign %s (no soak), created -> completed: %d ms" % (" -> ".join(names), total_ms))
print("sum of the regions' own times (regional campaign created -> last outcome, in the region's store): %d ms" % own)
print("overhead ratio (federation / sum of regions): %.3f" % (total_ms / max(1, own)))
exact = c["counts"]["applied"] == N * len(names) and c["counts"]["total"] == N * len(names) and c["counts"]["failed"] == 0
for p in c["regions"]:
    exact = exact and p["counts"]["applied"] == N and p["counts"]["total"] == N
    exact = exact and direct.get(p["region"], {}).get("applied") == N
print("counts: federation %d/%d applied, %d failed; per region %s: %s" %
      (c["counts"]["applied"], c["counts"]["total"], c["counts"]["failed"],
       ", ".join("%s %d" % (p["region"], p["counts"]["applied"]) for p in c["regions"]),
       "exact" if exact else "NOT EXACT"))
for name in names:
    # Per device, the regional campaign's creation to the hub recording the
    # outcome, from the region's own SQLite (as bench/scale.sh reports it).
    hl = lat[name]
    print("hub %s: per-device latency (campaign created -> outcome recorded) p50 %s s, p99 %s s, max %s s" %
          (name, hl.get("p50"), hl.get("p99"), hl.get("max")))
print("%-50s %6s %8s %8s %8s %6s" % ("requests made by this script", "n", "p50_ms", "p99_ms", "max_ms", "failed"))
for kind in sorted(set(LAT) | set(ERRS)):
    xs = LAT.get(kind, [0])
    print("%-50s %6d %8.1f %8.1f %8.1f %6d" % (kind, len(LAT.get(kind, [])), pct(xs, 0.5), pct(xs, 0.99), max(xs),
                                            ERRS.get(kind, 0)))
print("%-12s %14s %12s %12s %12s" % ("process", "cpu_s rollout", "cpu_s total", "peak_rss_MB", "rss_anon_MB"))
for label, pid in procs:
    print("%-12s %14.1f %12.1f %12.0f %12.0f" % (label, cpu1[pid] - cpu0[pid], cpu1[pid], mem_mb(pid, "VmHWM"),
                                               mem_mb(pid, "RssAnon")))
sys.exit(0 if exact else 1)
PY
  echo "whole script: $(( ($(now_ms) - T_SCRIPT) / 1000 )) s"
  exit $rc
fi

campaign_state() {  # url ca-or-empty token id -> state
  local ca=()
  [[ -n $2 ]] && ca=(--cacert "$2")
  curl -fsS "${ca[@]}" -H "Authorization: Bearer $3" "$1/v1/campaigns/$4" |
    python3 -c 'import json,sys; c=json.load(sys.stdin); print(c["state"], c["counts"].get("applied",0), c["counts"].get("total",0))'
}
if [[ $MODE == campaign ]]; then
  # Direct: v1 pushed to every region, one campaign created in each at once.
  declare -a CIDS
  for i in $(seq 1 "$REGIONS"); do
    bid=$(curl -fsS --cacert "${CAS[$i]}" -H "Authorization: Bearer ${TOKENS[$i]}" -H 'Content-Type: application/octet-stream' \
      --data-binary @"$TMP/b1.fbundle" "${URLS[$i]}/v1/bundles" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    CIDS[$i]=$bid
  done
  t0=$(now_ms)
  for i in $(seq 1 "$REGIONS"); do
    CIDS[$i]=$(curl -fsS --cacert "${CAS[$i]}" -H "Authorization: Bearer ${TOKENS[$i]}" -H 'Content-Type: application/json' \
      -d "{\"bundle\":\"${CIDS[$i]}\",\"selector\":\"sim-run=fedbench\",\"name\":\"direct\"}" "${URLS[$i]}/v1/campaigns" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  done
  direct_ms=0
  for i in $(seq 1 "$REGIONS"); do
    until read -r st applied total < <(campaign_state "${URLS[$i]}" "${CAS[$i]}" "${TOKENS[$i]}" "${CIDS[$i]}") &&
      [[ $st == completed && $applied == "$total" ]]; do
      case $st in stopped | aborted | paused | rolled_back) echo "direct r$i ended $st" >&2; exit 1 ;; esac
      sleep 0.2
    done
    echo "direct r$i: $applied/$total applied"
  done
  direct_ms=$(($(now_ms) - t0))
  # Through the federation: v2, all regions as one group.
  fbid=$(curl -fsS -H "Authorization: Bearer $FADMIN" -H 'Content-Type: application/octet-stream' \
    --data-binary @"$TMP/b2.fbundle" "$FED/v1/bundles" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  group=$(python3 -c "import json; print(json.dumps([['r%d' % i for i in range(1, $REGIONS + 1)]]))")
  t0=$(now_ms)
  fid=$(curl -fsS -H "Authorization: Bearer $FADMIN" -H 'Content-Type: application/json' \
    -d "{\"bundle\":\"$fbid\",\"selector\":\"sim-run=fedbench\",\"regions\":$group}" "$FED/v1/campaigns" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  until read -r st applied total < <(campaign_state "$FED" "" "$FADMIN" "$fid") && [[ $st == completed ]]; do
    case $st in stopped | aborted | paused) echo "federated campaign ended $st" >&2; exit 1 ;; esac
    sleep 0.2
  done
  fed_ms=$(($(now_ms) - t0))
  echo "regions=$REGIONS devices_per_region=$DEVICES"
  echo "direct: one campaign in each region at once, converged (last region completed) in ${direct_ms} ms"
  echo "federation: one campaign over all regions as one group, completed in ${fed_ms} ms ($applied/$total applied)"
  python3 -c "print('overhead ratio (federation / direct): %.2f' % ($fed_ms / max(1, $direct_ms)))"
  exit 0
fi

# The same pages read directly from each region, and through the federation.
LIMIT=100
direct_ms=0
for i in $(seq 1 "$REGIONS"); do
  t0=$(now_ms)
  for _ in $(seq 1 "$PAGES"); do
    curl -fsS --cacert "${CAS[$i]}" -H "Authorization: Bearer ${TOKENS[$i]}" "${URLS[$i]}/v1/devices?limit=$LIMIT" -o /dev/null
  done
  direct_ms=$((direct_ms + $(now_ms) - t0))
done
t0=$(now_ms)
for _ in $(seq 1 "$PAGES"); do
  curl -fsS -H "Authorization: Bearer $FADMIN" "$FED/v1/devices?limit=$((LIMIT * REGIONS))" -o /dev/null
done
fed_ms=$(($(now_ms) - t0))
total=$(curl -fsS -H "Authorization: Bearer $FADMIN" "$FED/v1/devices?limit=10000" |
  python3 -c 'import json,sys; print(len(json.load(sys.stdin)["items"]))')
echo "regions=$REGIONS devices_per_region=$DEVICES devices_seen_through_federation=$total"
echo "direct: $PAGES pages of $LIMIT from each of $REGIONS regions, one after another: ${direct_ms} ms"
echo "federation: $PAGES pages of $((LIMIT * REGIONS)) (regions asked in parallel): ${fed_ms} ms"
python3 -c "print('overhead ratio (federation / direct): %.2f' % ($fed_ms / max(1, $direct_ms)))"
