#!/usr/bin/env bash
# Agent footprint: stripped static binary size, idle RSS after connecting,
# peak RSS while applying a bundle with a 100 MB artifact, CPU seconds per
# idle hour (extrapolated from a short sample). Prints figures; asserts nothing.
#
#   bench/agent_footprint.sh [build-dir] [idle-seconds]
# Needs the hub, the agent, the CLI and the k3s stand-in built in build-dir.
set -euo pipefail
BUILD=${1:-$(cd "$(dirname "$0")/.." && pwd)/build}
IDLE_S=${2:-120}
BIN=$BUILD/bin
for b in flotilla-agent flotilla-hub k3s-standin; do [[ -x $BIN/$b ]] || { echo "missing $BIN/$b" >&2; exit 2; }; done
TMP=$(mktemp -d /tmp/flotilla-footprint-XXXXXX)
chmod 711 "$TMP"
HUB_PID= AGENT_PID=
cleanup() {
  [[ -n $AGENT_PID ]] && kill "$AGENT_PID" 2>/dev/null || true
  [[ -f $TMP/dev/run/flotilla/k3s.pid ]] && kill -9 -- "-$(cat "$TMP/dev/run/flotilla/k3s.pid")" 2>/dev/null || true
  [[ -n $HUB_PID ]] && kill "$HUB_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
wait_for() { local t=$1; shift; for _ in $(seq $((t * 10))); do "$@" && return 0; sleep 0.1; done; return 1; }
status() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

echo "binary: $(stat -c %s "$BIN/flotilla-agent") bytes ($(file -b "$BIN/flotilla-agent" | grep -o 'statically linked' || echo dynamic), $(file -b "$BIN/flotilla-agent" | grep -o 'stripped'))"

"$BIN/flotilla-hub" --data-dir "$TMP/hub" --listen 127.0.0.1:0 --config "" >"$TMP/hub.log" 2>&1 &
HUB_PID=$!
wait_for 20 test -s "$TMP/hub/hub.url"
HUB=$(head -1 "$TMP/hub/hub.url")
ADMIN=$(head -1 "$TMP/hub/admin.token")
wait_for 20 curl -fs "$HUB/readyz" -o /dev/null
api() { curl -fsS -H "Authorization: Bearer $ADMIN" "$@"; }
TOKEN=$(api -X POST -H 'Content-Type: application/json' -d '{"labels":{"env":"bench"},"ttl":"1h"}' \
  "$HUB/v1/enrollment-tokens" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')

"$BIN/flotilla" key generate --out "$TMP/release" >/dev/null
PUB=$(grep -o 'ed25519:[A-Za-z0-9+/=]*' "$TMP/release.pub" | head -1)
mkdir -p "$TMP/dev/usr/local/bin" "$TMP/dev/etc/flotilla"
cp "$BIN/k3s-standin" "$TMP/dev/usr/local/bin/k3s"
cat >"$TMP/dev/etc/flotilla/agent.yaml" <<YAML
hub-url: $HUB
enrollment-token: $TOKEN
root-keys:
  - $PUB
node-name: bench
health-timeout: 20s
health-settle: 2s
reconnect-max: 2s
drift-interval: 0
min-free: 1MiB
YAML
K3S_STANDIN_MAX_LIFETIME_S=900 "$BIN/flotilla-agent" --config "$TMP/dev/etc/flotilla/agent.yaml" --root "$TMP/dev" \
  >"$TMP/agent.log" 2>&1 &
AGENT_PID=$!
wait_for 30 grep -q "connected device=" "$TMP/agent.log"
sleep 2
echo "idle RSS after connecting: $(status $AGENT_PID VmRSS) kB"

# Idle CPU: ticks over a bounded window, extrapolated to an hour.
T0=$(cpu_ticks $AGENT_PID); S0=$(date +%s.%N)
sleep "$IDLE_S"
T1=$(cpu_ticks $AGENT_PID); S1=$(date +%s.%N)
HZ=$(getconf CLK_TCK)
python3 -c "t=($T1-$T0)/$HZ; s=$S1-$S0; print(f'idle CPU: {t:.2f} s over {s:.0f} s = {t*3600/s:.1f} CPU s per idle hour')"

# Peak RSS while applying a bundle with a 100 MB artifact (VmHWM).
mkdir -p "$TMP/spec/files"
head -c 100000000 /dev/urandom >"$TMP/spec/files/images.tar"
printf 'node-label: bench\n' >"$TMP/spec/files/10-bench.yaml"
cat >"$TMP/spec/bundle.yaml" <<YAML
name: bench
version: 1
expires-in: 1d
files:
  - kind: k3s-config
    source: files/10-bench.yaml
artifacts:
  - kind: airgap-images
    source: files/images.tar
YAML
"$BIN/flotilla" bundle build "$TMP/spec" --out "$TMP/bench.fbundle" >/dev/null
"$BIN/flotilla" bundle sign "$TMP/bench.fbundle" --key "$TMP/release.key" >/dev/null
"$BIN/flotilla" bundle push "$TMP/bench.fbundle" --hub "$HUB" --token-file "$TMP/hub/admin.token" -o json >"$TMP/push.json"
BID=$(python3 -c 'import json; print(json.load(open("'"$TMP/push.json"'"))["id"])')
api -X POST -H 'Content-Type: application/json' -d "{\"bundle\":\"$BID\",\"selector\":\"env=bench\"}" \
  "$HUB/v1/campaigns" >/dev/null
wait_for 180 grep -q "applied bundle=bench" "$TMP/agent.log" || { echo "apply did not finish; agent log:"; tail -20 "$TMP/agent.log"; exit 1; }
echo "peak RSS while applying a 100 MB artifact: $(status $AGENT_PID VmHWM) kB (RSS now $(status $AGENT_PID VmRSS) kB)"
