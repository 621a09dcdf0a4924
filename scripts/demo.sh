#!/usr/bin/env bash
# Flotilla end to end on one machine: a hub with its own mosquitto and SQLite,
# a handful of real agents (each with its own root directory and the k3s
# stand-in), a signed bundle and a campaign that runs to convergence.
#
#   scripts/demo.sh            interactive, live progress
#   scripts/demo.sh --ci       no terminal needed; exit 1 unless the campaign converges
#   options: --devices N (default 5), --keep (keep the scratch directory), --no-build
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CI_MODE=0
DEVICES=5
KEEP=0
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --ci) CI_MODE=1 ;;
    --devices) DEVICES="$2"; shift ;;
    --keep) KEEP=1 ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$DEVICES" in ''|*[!0-9]*) echo "demo: --devices needs a number" >&2; exit 2 ;; esac

# ninja prints "[n/N] step" for every step: on a terminal one line that
# updates in place, otherwise a line every tenth of the way (CI logs stay
# short). Anything else (stages, compiler errors) passes through as it is.
build_progress() {
  local line last=-1 n total tty=0
  [ -t 1 ] && [ "$CI_MODE" = 0 ] && tty=1
  while IFS= read -r line; do
    if [[ "$line" =~ ^\[([0-9]+)/([0-9]+)\]\ (.*)$ ]]; then
      n=${BASH_REMATCH[1]} total=${BASH_REMATCH[2]}
      if [ "$tty" = 1 ]; then
        printf '\r    [%d/%d] %-70.70s' "$n" "$total" "${BASH_REMATCH[3]}"
      elif [ $((n * 10 / total)) -ne "$last" ] || [ "$n" = "$total" ]; then
        last=$((n * 10 / total))
        echo "    [$n/$total] ${BASH_REMATCH[3]}"
      fi
    elif [[ "$line" == "ninja: no work to do."* ]]; then
      echo "    up to date"
    else
      [ "$tty" = 1 ] && printf '\n'
      echo "$line"
    fi
  done
  [ "$tty" = 1 ] && printf '\n'
  return 0
}

if [ "$BUILD" = 1 ]; then
  "$ROOT/scripts/setup.sh"
  if [ -f "$ROOT/build/build.ninja" ]; then
    echo "==> building (incremental)"
  else
    echo "==> first build: a minimal OpenSSL for the agent, then everything (about ten minutes on two cores)"
  fi
  "$ROOT/scripts/build.sh" 2>&1 | build_progress
fi
BIN="${FLOTILLA_BIN_DIR:-$ROOT/build/bin}"
for b in flotilla flotilla-hub flotilla-agent k3s-standin; do
  [ -x "$BIN/$b" ] || { echo "demo: $BIN/$b is missing; run without --no-build" >&2; exit 1; }
done

WORK="$(mktemp -d /tmp/flotilla-demo.XXXXXX)"
chmod 0711 "$WORK"  # lets a root-started mosquitto, which drops to its own user, reach its files
PIDS=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  # The agents leave k3s running on purpose (as on a real device); stop the stand-ins.
  for pf in "$WORK"/devices/*/run/flotilla/k3s.pid; do
    [ -f "$pf" ] && kill -- "-$(cat "$pf")" 2>/dev/null || true
  done
  if [ "$KEEP" = 1 ]; then
    echo "==> kept $WORK (hub log: $WORK/hub.log)"
  else
    rm -rf "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { echo "==> $*"; }
export K3S_STANDIN_MAX_LIFETIME_S=900   # a safety net: stand-ins never outlive the demo for long

say "starting flotilla-hub (embedded mosquitto + SQLite) in $WORK/hub"
"$BIN/flotilla-hub" --data-dir "$WORK/hub" --listen 127.0.0.1:0 >"$WORK/hub.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
  [ -f "$WORK/hub/hub.url" ] && curl -fsS "$(cat "$WORK/hub/hub.url")/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "$(cat "$WORK/hub/hub.url" 2>/dev/null)/readyz" >/dev/null 2>&1 || { echo "hub did not become ready:"; cat "$WORK/hub.log"; exit 1; }
export FLOTILLA_HUB="$(cat "$WORK/hub/hub.url")"
export FLOTILLA_TOKEN_FILE="$WORK/hub/admin.token"
F="$BIN/flotilla"
say "hub ready at $FLOTILLA_HUB"

say "generating a release signing key"
mkdir -p "$WORK/keys"
"$F" key generate --out "$WORK/keys/release" | sed 's/^/    /'
PUB="$(grep '^public:' "$WORK/keys/release.pub" | awk '{print $2}')"

# Each agent names its own shelf: the token lets devices choose that key (and no other).
ENROLL="$("$F" enrollment-token create --label env=demo --label site=lab --device-label-key shelf \
  --max-uses "$DEVICES" --ttl 1h 2>/dev/null)"
say "created an enrollment token for $DEVICES devices"

say "starting $DEVICES agents, each with its own root and the k3s stand-in"
for i in $(seq 1 "$DEVICES"); do
  dev="$WORK/devices/dev-$i"
  mkdir -p "$dev/usr/local/bin" "$dev/etc/flotilla"
  cp "$BIN/k3s-standin" "$dev/usr/local/bin/k3s"
  # The hub's device CA, pinned as an image would carry it (flotilla image
  # inject --device-ca): the broker is mutual TLS, each device's client
  # certificate issued at enrollment for its own key.
  cp "$WORK/hub/ca/device-ca.pem" "$dev/etc/flotilla/device-ca.pem"
  cat >"$dev/etc/flotilla/agent.yaml" <<YAML
hub-url: $FLOTILLA_HUB
enrollment-token: $ENROLL
root-keys:
  - $PUB
device-ca-file: /etc/flotilla/device-ca.pem
labels:
  shelf: "$i"
node-name: dev-$i
health-timeout: 30s
health-settle: 3s
reconnect-max: 5s
YAML
  "$BIN/flotilla-agent" --config "$dev/etc/flotilla/agent.yaml" --root "$dev" >"$dev/agent.log" 2>&1 &
  PIDS+=($!)
done

for _ in $(seq 1 300); do
  online="$("$F" device list -o json | grep -c '"online": true' || true)"
  [ "$online" -ge "$DEVICES" ] && break
  sleep 0.1
done
say "$online of $DEVICES devices enrolled and online"
"$F" device list | sed 's/^/    /'

say "building and signing the demo bundle (bundles/examples/demo)"
"$F" bundle build "$ROOT/bundles/examples/demo" --out "$WORK/edge-base.fbundle" | sed 's/^/    /'
"$F" bundle sign "$WORK/edge-base.fbundle" --key "$WORK/keys/release.key" | sed 's/^/    /'
"$F" bundle verify "$WORK/edge-base.fbundle" --key "$WORK/keys/release.pub" | sed 's/^/    /'
BUNDLE_ID="$("$F" bundle push "$WORK/edge-base.fbundle" -o json | sed -n 's/^  "id": "\(.*\)",$/\1/p')"
say "pushed bundle $BUNDLE_ID"

CAMPAIGN="$("$F" campaign create --bundle "$BUNDLE_ID" --selector env=demo --name demo-rollout -o json | sed -n 's/^  "id": "\(c-[^"]*\)",$/\1/p' | head -1)"
say "campaign $CAMPAIGN: rolling edge-base v1 out to env=demo"
set +e
"$F" campaign status "$CAMPAIGN" --watch --timeout 120s --interval 200ms
rc=$?
set -e

say "devices after the campaign"
"$F" device list | sed 's/^/    /'
dev1="$WORK/devices/dev-1"
say "what the agent installed on dev-1 (under its root $dev1)"
ls -l "$dev1/etc/rancher/k3s/config.yaml.d" "$dev1/var/lib/rancher/k3s/server/manifests" 2>/dev/null | sed 's/^/    /'
if [ -x "$dev1/usr/local/bin/k3s" ]; then
  echo "    k3s (stand-in) readyz: $("$dev1/usr/local/bin/k3s" kubectl --kubeconfig "$dev1/etc/rancher/k3s/k3s.yaml" get --raw /readyz 2>&1)"
fi

if [ "$rc" -eq 0 ]; then
  say "converged: every device applied the signed bundle"
else
  say "NOT converged (exit $rc); hub log: $WORK/hub.log"
  KEEP=1
fi
exit "$rc"
