#!/usr/bin/env bash
# Federation overhead on reads: R regional hubs over TLS (each its own CA),
# N simulated devices enrolled in each by flotilla-sim (which also runs its
# own campaign there), then the same paged device list read directly from
# every region and through a federation in front of them. Prints the time of
# each and the overhead ratio (federation / sum of direct). Asserts nothing.
# Small by default; take the shared CPU lock around it on a shared machine.
#
#   bench/federation.sh [build-dir] [regions] [devices-per-region] [pages]
set -euo pipefail
BUILD=${1:-$(cd "$(dirname "$0")/.." && pwd)/build}
REGIONS=${2:-2}
DEVICES=${3:-500}
PAGES=${4:-20}
BIN=$BUILD/bin
for b in flotilla-hub flotilla-sim; do [[ -x $BIN/$b ]] || { echo "missing $BIN/$b" >&2; exit 2; }; done
TMP=$(mktemp -d /tmp/flotilla-federation-bench-XXXXXX)
chmod 711 "$TMP"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
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

declare -a URLS CAS TOKENS
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
  start_hub "$d" --tls-cert "$d.pki/hub.pem" --tls-key "$d.pki/hub.key"
  URLS[$i]=$(head -1 "$d/hub.url")
  CAS[$i]=$d.pki/ca.pem
  wait_for 30 curl -fs --cacert "${CAS[$i]}" "${URLS[$i]}/readyz" -o /dev/null
  ADMIN=$(head -1 "$d/admin.token")
  TOKENS[$i]=$(curl -fsS --cacert "${CAS[$i]}" -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
    -d '{"name":"federation","role":"operator","project":"*"}' "${URLS[$i]}/v1/tokens" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  printf '%s\n' "${TOKENS[$i]}" >"$d.op.token"
  # The simulator enrolls the devices (and runs its own campaign) at this region.
  SSL_CERT_FILE=${CAS[$i]} "$BIN/flotilla-sim" run --hub "${URLS[$i]}" --token-file "$d.op.token" \
    --devices "$DEVICES" --devices-per-gateway 1000 --seed "$i" --out "$d.sim" --no-progress --timeout 300s >/dev/null
done

start_hub "$TMP/fed" --role federation
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
