#!/usr/bin/env bash
# The dashboard in a real browser against a real hub and real agents: Debian's
# chromium driven by playwright-core (ui/e2e/dashboard.test.mjs). A hub with
# its UI listener, five flotilla-agents with the k3s stand-in (one of them
# labelled so the bundle's overlay makes its k3s fail to start), a signed
# bundle, and API tokens for an operator and a viewer; the browser script
# then signs in, follows a campaign it creates to completion, pauses,
# resumes and approves it with the buttons, checks what a viewer sees and
# that a forged action is refused, and opens the failed device's page.
# Screenshots go to $FLOTILLA_ARTIFACTS_DIR (default: <bin>/../ui-artifacts).
#
# Exit 77 (skip) only when chromium (or node, which drives it) is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${FLOTILLA_BIN_DIR:?FLOTILLA_BIN_DIR must name build/bin}"
CHROMIUM="${FLOTILLA_CHROMIUM:-/usr/bin/chromium}"
ARTIFACTS="${FLOTILLA_ARTIFACTS_DIR:-$BIN/../ui-artifacts}"
. "$ROOT/scripts/node-env.sh"
if [ ! -x "$CHROMIUM" ]; then
  echo "SKIP: $CHROMIUM is missing (scripts/setup.sh installs Debian's chromium)"
  exit 77
fi
if ! command -v node >/dev/null; then
  echo "SKIP: node is missing (scripts/setup.sh installs it)"
  exit 77
fi
if [ ! -d "$ROOT/ui/node_modules/playwright-core" ]; then
  echo "FAIL: ui/node_modules has no playwright-core; run scripts/setup.sh (npm ci in ui/)"
  exit 1
fi
DEVICES=5
WORK="$(mktemp -d /tmp/flotilla-ui-e2e.XXXXXX)"
chmod 0711 "$WORK"
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for pf in "$WORK"/devices/*/run/flotilla/k3s.pid; do
    [ -f "$pf" ] && kill -- "-$(cat "$pf")" 2>/dev/null || true
  done
  if [ "$rc" -ne 0 ]; then
    echo "---- hub log (last 60 lines) ----"
    tail -n 60 "$WORK/hub.log" 2>/dev/null || true
    mkdir -p "$ARTIFACTS" && cp "$WORK/hub.log" "$ARTIFACTS/hub.log" 2>/dev/null || true
    for log in "$WORK"/devices/*/agent.log; do
      [ -f "$log" ] || continue
      echo "---- $(basename "$(dirname "$log")") agent log (last 15 lines) ----"
      tail -n 15 "$log"
    done
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
export K3S_STANDIN_MAX_LIFETIME_S=600

"$BIN/flotilla-hub" --data-dir "$WORK/hub" --listen 127.0.0.1:0 --ui-listen 127.0.0.1:0 \
  --views-timeline-interval 1s >"$WORK/hub.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 200); do
  [ -f "$WORK/hub/ui.url" ] && curl -fsS "$(cat "$WORK/hub/hub.url")/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
export FLOTILLA_HUB="$(cat "$WORK/hub/hub.url")"
export FLOTILLA_TOKEN_FILE="$WORK/hub/admin.token"
UI_URL="$(cat "$WORK/hub/ui.url")"
F="$BIN/flotilla"

"$F" key generate --out "$WORK/release" >/dev/null
PUB="$(grep '^public:' "$WORK/release.pub" | awk '{print $2}')"
# Devices set their own role and cell; the token must allow those keys.
ENROLL="$("$F" enrollment-token create --label env=ui --label region=eu-west --device-label-key role \
  --device-label-key cell --max-uses "$DEVICES" --ttl 1h 2>/dev/null)"
for i in $(seq 1 "$DEVICES"); do
  dev="$WORK/devices/dev-$i"
  mkdir -p "$dev/usr/local/bin" "$dev/etc/flotilla"
  cp "$BIN/k3s-standin" "$dev/usr/local/bin/k3s"
  role=steady
  [ "$i" = 3 ] && role=flaky
  cat >"$dev/etc/flotilla/agent.yaml" <<YAML
hub-url: $FLOTILLA_HUB
enrollment-token: $ENROLL
root-keys:
  - $PUB
labels:
  role: $role
  cell: cell-$(( (i % 2) + 1 ))
node-name: ui-$i
health-timeout: 6s
health-settle: 1s
reconnect-max: 2s
YAML
  "$BIN/flotilla-agent" --config "$dev/etc/flotilla/agent.yaml" --root "$dev" >"$dev/agent.log" 2>&1 &
  PIDS+=($!)
done

# The bundle: a k3s drop-in for everyone, and for role=flaky a k3s config the
# stand-in refuses to start with (its health gate fails; the agent rolls back).
mkdir -p "$WORK/spec"
printf 'node-label:\n  - "flotilla.io/ui-test=1"\n' >"$WORK/spec/50-ui.yaml"
cat >"$WORK/spec/bundle.yaml" <<YAML
name: ui-test
version: 1
expires-in: 20d
files:
  - kind: k3s-config
    source: 50-ui.yaml
overlays:
  - selector: role=flaky
    k3s-config:
      standin-fail-start: true
YAML
"$F" bundle build "$WORK/spec" --out "$WORK/ui.fbundle" >/dev/null
"$F" bundle sign "$WORK/ui.fbundle" --key "$WORK/release.key" >/dev/null
BUNDLE_ID="$("$F" bundle push "$WORK/ui.fbundle" -o json | sed -n 's/^  "id": "\(.*\)",$/\1/p')"
OPERATOR="$("$F" token create ui-operator --role operator --project '*' 2>/dev/null)"
VIEWER="$("$F" token create ui-viewer --role viewer --project '*' 2>/dev/null)"
[ -n "$BUNDLE_ID" ] && [ -n "$OPERATOR" ] && [ -n "$VIEWER" ] || { echo "FAIL: setup (bundle or tokens)"; exit 1; }

mkdir -p "$ARTIFACTS"
UI_URL="$UI_URL" HUB_URL="$FLOTILLA_HUB" ADMIN_TOKEN="$(cat "$WORK/hub/admin.token")" OPERATOR_TOKEN="$OPERATOR" \
  VIEWER_TOKEN="$VIEWER" BUNDLE_ID="$BUNDLE_ID" DEVICES="$DEVICES" ARTIFACTS="$ARTIFACTS" CHROMIUM="$CHROMIUM" \
  node "$ROOT/ui/e2e/dashboard.test.mjs"
