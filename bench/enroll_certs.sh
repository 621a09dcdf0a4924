#!/usr/bin/env bash
# Direct enrollment with certificates while many sessions are connected
# (issue 16). Starts `flotilla-sim run` in direct mode with SESSIONS sessions
# over mutual TLS (its own hub; the campaign is released at 1 device/min so
# the sessions stay connected), waits until the hub sees them online, then
# enrolls IDENTITIES more direct identities with bench/enroll_certs
# (THREADS concurrent requests) and prints its table: rate per stretch,
# mosquitto's RSS, the bytes of every file mosquitto reads, the hub's broker
# reload count. Before issue 16 a direct enrollment rewrote the password file
# and reloaded mosquitto: 67/s with 19,000 sessions (docs/scale.md).
#
#   bench/enroll_certs.sh [SESSIONS] [IDENTITIES] [THREADS] [CONNECTIONS]
#     (default 19000 100000 32 new; CONNECTIONS: `new` = a TCP connection per
#     enrollment, as devices make; `keep-alive` = one per client thread)
#   FLOTILLA_BENCH_HUB_THREADS=N   the hub's REST threads (default 64; the
#     hub's own default is 16). flotilla-sim gives its hub one REST thread per
#     enrollment thread (2..64), so this sets the simulator's --enroll-threads.
#
# Run it under the CPU lock; it takes a few minutes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${FLOTILLA_BIN_DIR:-$ROOT/build/bin}"
SESSIONS="${1:-19000}"
IDENTITIES="${2:-100000}"
THREADS="${3:-32}"
CONNECTIONS="${4:-new}"
HUB_THREADS="${FLOTILLA_BENCH_HUB_THREADS:-64}"
OUT="${TMPDIR:-/tmp}/flotilla-enroll-certs-$$"
mkdir -p "$OUT"
SIM_PID=
cleanup() { [ -n "$SIM_PID" ] && kill "$SIM_PID" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "enroll-certs: $SESSIONS sessions (flotilla-sim, direct, mutual TLS), then $IDENTITIES enrollments; hub REST threads $HUB_THREADS; out $OUT"
"$BIN/flotilla-sim" run --devices "$SESSIONS" --mode direct --processes $(( (SESSIONS + 4999) / 5000 )) \
  --enroll-threads "$HUB_THREADS" --seed 1 --label enroll-certs --no-progress --timeout 60m \
  --strategy '{"rate": {"max_per_minute": 1}}' --out "$OUT/sim" >"$OUT/sim.out" 2>"$OUT/sim.err" &
SIM_PID=$!
HUB="$OUT/sim/hub"
start=$(date +%s)
until [ -f "$HUB/hub.url" ] && [ -f "$HUB/admin.token" ]; do
  kill -0 "$SIM_PID" 2>/dev/null || { echo "flotilla-sim ended:"; tail -20 "$OUT/sim.err" "$OUT/sim.out"; exit 1; }
  sleep 1
done
URL="$(cat "$HUB/hub.url")"
TOKEN="$(cat "$HUB/admin.token")"
online=0
while [ "$online" -lt "$SESSIONS" ]; do
  kill -0 "$SIM_PID" 2>/dev/null || { echo "flotilla-sim ended:"; tail -20 "$OUT/sim.err" "$OUT/sim.out"; exit 1; }
  sleep 5
  online="$(curl -fsS -H "Authorization: Bearer $TOKEN" "$URL/metrics" |
    sed -n 's/^flotilla_devices_presence{presence="online"} \([0-9]*\).*/\1/p')"
  online="${online:-0}"
  echo "  $(( $(date +%s) - start )) s: $online of $SESSIONS sessions online"
done
echo "sessions connected after $(( $(date +%s) - start )) s; the simulator's enrollment: $(grep -o 'enroll[^,]*/s' "$OUT/sim.err" "$OUT/sim.out" | tail -1)"
"$BIN/enroll_certs" "$HUB" "$IDENTITIES" "$THREADS" 5 "$CONNECTIONS" | tee "$OUT/enroll_certs.txt"
online="$(curl -fsS -H "Authorization: Bearer $TOKEN" "$URL/metrics" |
  sed -n 's/^flotilla_devices_presence{presence="online"} \([0-9]*\).*/\1/p')"
echo "sessions still online at the end: $online"
