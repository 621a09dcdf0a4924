# Shared by bench/scale.sh and bench/cells.sh (sourced, not run): one
# flotilla-sim rung against its own hub, the raw broker round trip of the same
# messages beside it, and the shared CPU lock. The caller sets BIN (the
# build's bin directory) and `set -euo pipefail`.

# sim_rung DIR MODE DEVICES PER_GATEWAY [more flotilla-sim run flags]
# Runs `flotilla-sim run` (its own hub, FLOTILLA_HUB_* passed through) into
# DIR; its stdout, stderr and /usr/bin/time -v beside it (DIR.out, DIR.err,
# DIR.time). Later flags win, so the caller's override these defaults.
# FLOTILLA_BENCH_SIM_TIMEOUT (e.g. 40m) replaces the run's --timeout.
sim_rung() {
  local dir="$1" mode="$2" n="$3" per="$4"
  shift 4
  local timeout=15m
  [ "$n" -ge 1000000 ] && timeout=40m
  # A slower rung (direct mode near 70k sessions enrolls at 50-120 devices/s).
  timeout="${FLOTILLA_BENCH_SIM_TIMEOUT:-$timeout}"
  local args=(run --devices "$n" --mode "$mode" --out "$dir" --timeout "$timeout" --enroll-threads 4
              --seed 1 --label "$(basename "$dir")" --no-progress)
  [ "$mode" = gateway ] && args+=(--devices-per-gateway "$per")
  # Direct mode connects many sessions at once (each enrollment waits for
  # the hub's answer and a TLS handshake), from one simulator process per
  # 15,000 sessions: a process holds at most 20,000 open files, and its
  # sessions share one epoll thread (--mqtt-client loop, docs/simulator.md).
  # FLOTILLA_BENCH_SIM_CLIENT=paho measures Paho C instead (one process per
  # 2,000 sessions: Paho's cost per message grows with a process's sessions).
  if [ "$mode" = direct ]; then
    local client="${FLOTILLA_BENCH_SIM_CLIENT:-loop}" per_process=15000
    [ "$client" = paho ] && per_process=2000
    args+=(--enroll-threads 128 --mqtt-client "$client" --processes $(( (n + per_process - 1) / per_process )))
  fi
  # Above 100k devices the hub's store outgrows its page cache (docs/operations.md).
  local mmap=0
  [ "$n" -gt 100000 ] && mmap=2048
  echo "== $(basename "$dir"): flotilla-sim ${args[*]} $*" >&2
  FLOTILLA_HUB_DB_MMAP_MIB="${FLOTILLA_HUB_DB_MMAP_MIB:-$mmap}" /usr/bin/time -v -o "$dir.time" \
    "$BIN/flotilla-sim" "${args[@]}" "$@" >"$dir.out" 2>"$dir.err" || true
  tail -2 "$dir.out" >&2 || true
}

# sim_baseline DIR MODE DEVICES PER_GATEWAY [BROKERS]
# The same messages as the rung (one QoS 1 desired state out per device, five
# QoS 1 reports back; gateways gather theirs for 200 ms like flotilla-sim
# run's --gateway-flush-ms, direct devices send one by one) through bare
# mosquittos with the same session layout. With BROKERS > 1, one bare
# mosquitto per cell carries its share of the devices and sessions, all at
# once; the round trip is the slowest of them. Writes DIR.baseline.json.
sim_baseline() {
  local dir="$1" mode="$2" n="$3" per="$4" brokers="${5:-1}"
  local sessions=1 flush=0
  if [ "$mode" = gateway ]; then
    sessions=$(( (n + per - 1) / per ))
    flush=200
  else
    sessions=$(( n < 20 ? n : 20 ))
  fi
  if [ "$brokers" -le 1 ]; then
    "$BIN/flotilla-sim" baseline --devices "$n" --sessions "$sessions" --reports 5 --flush-ms "$flush" \
      --out "$dir-baseline" >"$dir.baseline.json" 2>"$dir.baseline.err" || true
    return
  fi
  local b pids=()
  for b in $(seq 0 $(( brokers - 1 ))); do
    "$BIN/flotilla-sim" baseline --devices $(( n / brokers )) --sessions $(( (sessions + brokers - 1) / brokers )) \
      --reports 5 --flush-ms "$flush" --out "$dir-baseline-$b" >"$dir.baseline-$b.json" 2>"$dir.baseline-$b.err" &
    pids+=($!)
  done
  for b in "${pids[@]}"; do wait "$b" || true; done
  python3 - "$dir" "$brokers" >"$dir.baseline.json" <<'PY'
import json, sys
d, k = sys.argv[1], int(sys.argv[2])
parts = []
for b in range(k):
    try:
        with open(f"{d}.baseline-{b}.json") as f: parts.append(json.load(f))
    except Exception:
        parts.append({"complete": False})
secs = max((p.get("seconds", 0) for p in parts), default=0)
msgs = sum(p.get("messages", 0) for p in parts)
print(json.dumps({"brokers": k, "devices": sum(p.get("devices", 0) for p in parts),
                  "sessions": sum(p.get("sessions", 0) for p in parts), "messages": msgs,
                  "complete": all(p.get("complete") for p in parts), "seconds": secs,
                  "messages_per_s": msgs / secs if secs else 0, "parts": parts}))
PY
}

# with_cpu_lock CMD...: runs CMD holding the machine's shared CPU lock
# (FLOTILLA_BENCH_LOCK, default /tmp/flotilla-cpu.lock; empty: no lock), so a
# rung never shares the cores with another engineer's build or test.
with_cpu_lock() {
  local lock="${FLOTILLA_BENCH_LOCK-/tmp/flotilla-cpu.lock}"
  if [ -z "$lock" ]; then "$@"; return; fi
  local fd
  exec {fd}>>"$lock"
  flock "$fd"
  local rc=0
  "$@" || rc=$?
  flock -u "$fd"
  exec {fd}>&-
  return "$rc"
}
