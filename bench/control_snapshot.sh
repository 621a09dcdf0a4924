#!/usr/bin/env bash
# What a snapshot of the control log costs on a real etcd member
# (docs/adr/0016, "Snapshots and trimming"): starts one etcd 3.4 member on
# loopback (Debian's etcd-server, with a 8 GiB backend quota), then runs
# build/bin/control_snapshot for each fleet size: a store of N enrolled
# devices snapshotted into etcd and loaded by a hub with an empty store.
# Prints the snapshot's bytes per device, write and load times, the loading
# hub's peak RSS, and etcd's database size after each.
#
#   bench/control_snapshot.sh [DEVICES...]   (default: 100000 1000000)
#
# Run it under the CPU lock; 1M devices takes a few minutes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${FLOTILLA_BIN_DIR:-$ROOT/build/bin}"
ETCD="${FLOTILLA_ETCD:-/usr/bin/etcd}"
SIZES=("$@")
[ "${#SIZES[@]}" -gt 0 ] || SIZES=(100000 1000000)
OUT="${TMPDIR:-/tmp}/flotilla-control-snapshot-$$"
mkdir -p "$OUT"
ETCD_PID=
cleanup() { [ -n "$ETCD_PID" ] && kill "$ETCD_PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$OUT"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CLIENT="http://127.0.0.1:$(port)"
PEER="http://127.0.0.1:$(port)"
"$ETCD" --name bench --data-dir "$OUT/etcd" --listen-client-urls "$CLIENT" --advertise-client-urls "$CLIENT" \
  --listen-peer-urls "$PEER" --initial-advertise-peer-urls "$PEER" --initial-cluster "bench=$PEER" \
  --quota-backend-bytes $((8 << 30)) --log-level error >"$OUT/etcd.log" 2>&1 &
ETCD_PID=$!
for _ in $(seq 100); do curl -sf "$CLIENT/health" >/dev/null 2>&1 && break; sleep 0.2; done
curl -sf "$CLIENT/health" >/dev/null || { echo "etcd did not start; see $OUT/etcd.log" >&2; exit 1; }
echo "control-snapshot: etcd $("$ETCD" --version | head -1 | awk '{print $3}') at $CLIENT; sizes ${SIZES[*]}"
for n in "${SIZES[@]}"; do
  echo "== $n devices"
  rm -rf "$OUT/run"
  mkdir -p "$OUT/run"
  "$BIN/control_snapshot" "$OUT/run" "$n" "$CLIENT"
  size=$(curl -s -X POST "$CLIENT/v3/maintenance/status" -d '{}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["dbSize"])')
  echo "etcd database: $(( size / 1000000 )) MB"
done
