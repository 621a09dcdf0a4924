// Trust and overlays through the real pipeline: flotilla-hub with its
// mosquitto, real flotilla-agent processes pinned to a root keyring file
// (`root-keyring`), the k3s stand-in. The operator rotates the root, issues a
// signing keyring, stores the trust message on the hub (PUT /v1/trust, the
// CLI's `trust push`), and the hub attaches it to every desired state.
#include <catch2/catch.hpp>

#include <fstream>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/bundles/trust.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

const std::vector<std::string> kExclude = {"var/lib/flotilla", "run/", "var/log/"};

int64_t now_unix() { return SystemClock::instance().now_unix(); }

v1::KeyringManifest keyring(bundles::KeyringRole role, uint64_t version, const std::vector<const bundles::KeyPair*>& keys,
                            const std::vector<const bundles::KeyPair*>& revoked = {}) {
  v1::KeyringManifest k;
  k.set_type(std::string(bundles::keyring_type(role)));
  k.set_version(version);
  k.set_created_unix(now_unix() - 60);
  k.set_expires_unix(now_unix() + 86400);
  k.set_threshold(1);
  for (const auto* key : keys) *k.add_keys() = bundles::trusted_key(key->pub);
  for (const auto* key : revoked) k.add_revoked_key_ids(key->pub.key_id);
  return k;
}

v1::SignedKeyring signed_with(const v1::KeyringManifest& k, const std::vector<const bundles::KeyPair*>& keys) {
  auto r = bundles::wrap_keyring(k);
  for (const auto* key : keys) REQUIRE(bundles::sign_keyring(r, *key).ok());
  return r;
}

BuiltBundle sign_manifest(const v1::BundleManifest& m, const bundles::KeyPair& key) {
  BuiltBundle b;
  b.envelope = bundles::wrap(m);
  REQUIRE(bundles::sign(b.envelope, key).ok());
  b.bytes = bundles::serialize_envelope(b.envelope);
  return b;
}

std::string read(const stdfs::path& p) {
  auto r = fs::read_file(p, 1 << 20);
  return r ? *r : std::string("<missing>");
}

// The operator's keys: root v1 (pinned in the devices' image) → v2 → v3,
// and the bundle-signing keys.
struct Operator {
  bundles::KeyPair root1 = bundles::generate_key(), root2 = bundles::generate_key(), root3 = bundles::generate_key();
  bundles::KeyPair signer = bundles::generate_key(), compromised = bundles::generate_key();
  v1::SignedKeyring root_v1 = signed_with(keyring(bundles::KeyringRole::root, 1, {&root1}), {&root1});
};

// A hub and two agents (site=berlin, site=paris) pinned to root v1 by file.
struct TrustFleet {
  TempDir tmp;
  Hub hub{tmp.path() / "hub"};
  Operator op;
  std::vector<std::unique_ptr<Agent>> agents;

  TrustFleet() {
    hub.start();
    for (const std::string site : {"berlin", "paris"}) {
      const std::string token = hub.enrollment_token({{"env", "it"}, {"site", site}}, 1);
      AgentOptions o;
      // A plain key nobody signs with: root-keyring takes precedence.
      o.root_keys = {bundles::public_key_text(bundles::generate_key().pub)};
      o.health_timeout = "5s";
      auto a = std::make_unique<Agent>(tmp.path() / ("dev-" + site), hub.url(), token, o);
      REQUIRE(bundles::write_keyring_file(a->root() / "etc/flotilla/root.v1.krg", op.root_v1).ok());
      a->append_config("root-keyring: /etc/flotilla/root.v1.krg\n");
      a->start();
      agents.push_back(std::move(a));
    }
    const bool online = wait_until(
        [&] {
          size_t n = 0;
          for (const auto& d : hub.devices()) n += d["online"].get<bool>() && d["k3s_version"] != "" ? 1 : 0;
          return n == agents.size();
        },
        std::chrono::seconds(60));
    INFO(hub.log() << "\n" << agents[0]->log());
    REQUIRE(online);
  }

  std::string push(const BuiltBundle& b) {
    auto [status, body] = hub.call("POST", "/v1/bundles", b.bytes, "application/octet-stream");
    INFO(body.dump());
    REQUIRE((status == 201 || status == 200));
    return body["id"].get<std::string>();
  }
};

v1::BundleManifest manifest(uint64_t version) {
  v1::BundleManifest m =
      make_manifest("edge", version,
                    {{v1::FILE_KIND_K3S_CONFIG, "50-edge.yaml", "node-label:\n  - \"tier=edge\"\n"},
                     {v1::FILE_KIND_MANIFEST, "hello.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: hello\n"}});
  m.set_k3s_version("v1.30.4+k3s1");
  return m;
}

}  // namespace

TEST_CASE("root rotation v1->v3 reaches pinned agents through the hub, a revoked key's bundle is refused",
          "[integration][trust][agent]") {
  TrustFleet fleet;
  auto& op = fleet.op;
  // Rotation: each new root is signed by the previous root and by itself.
  auto root_v2 = signed_with(keyring(bundles::KeyringRole::root, 2, {&op.root2}), {&op.root1, &op.root2});
  auto root_v3 = signed_with(keyring(bundles::KeyringRole::root, 3, {&op.root3}), {&op.root2, &op.root3});
  auto signing = signed_with(keyring(bundles::KeyringRole::signing, 1, {&op.signer}, {&op.compromised}), {&op.root3});
  v1::Trust trust;
  *trust.add_roots() = op.root_v1;
  *trust.add_roots() = root_v2;
  *trust.add_roots() = root_v3;
  *trust.mutable_signing() = signing;

  // The hub refuses garbage and keeps nothing.
  auto [bad_status, bad_body] = fleet.hub.call("PUT", "/v1/trust", "not a trust message", "application/octet-stream");
  CHECK(bad_status == 400);
  CHECK(fleet.hub.call("GET", "/v1/trust").first == 404);

  // `flotilla trust push` stores it; GET /v1/trust summarises it.
  const auto trust_file = fleet.tmp.path() / "trust.pb";
  std::ofstream(trust_file, std::ios::binary) << trust.SerializeAsString();
  auto pushed = fleet.hub.cli({"trust", "push", trust_file.string()});
  INFO(pushed.out << pushed.err);
  REQUIRE(pushed.exit_code == 0);
  auto [st, summary] = fleet.hub.call("GET", "/v1/trust");
  REQUIRE(st == 200);
  CHECK(summary["root_version"] == 3);
  CHECK(summary["signing_version"] == 1);
  CHECK(summary["signing"]["key_ids"] == json::array({op.signer.pub.key_id}));
  CHECK(summary["signing"]["revoked_key_ids"] == json::array({op.compromised.pub.key_id}));
  auto shown = fleet.hub.cli({"trust", "show"});
  CHECK(shown.exit_code == 0);
  CHECK(shown.out.find(op.signer.pub.key_id) != std::string::npos);

  // A bundle signed under v3's signing keyring is applied by agents pinned to v1.
  json c = run_campaign(fleet.hub, fleet.push(sign_manifest(manifest(1), op.signer)), "env=it");
  INFO(c.dump(2));
  INFO(fleet.agents[0]->log());
  CHECK(c["state"] == "completed");
  CHECK(c["counts"]["applied"] == 2);
  for (const auto& a : fleet.agents) {
    CHECK(read(a->root() / "var/lib/rancher/k3s/server/manifests/hello.yaml").find("name: hello") !=
          std::string::npos);
    // The agent persisted the trust it moved to.
    auto state = fs::read_file(a->root() / "var/lib/flotilla/trust.pb", bundles::kMaxTrustBytes);
    REQUIRE(state.ok());
    auto restored = bundles::TrustStore::restore(*state);
    REQUIRE(restored.ok());
    CHECK(restored->root_version() == 3);
    CHECK(restored->signing_version() == 1);
  }

  // A bundle signed by the revoked key is refused; nothing on the node changes.
  std::vector<std::map<std::string, std::string>> before;
  for (const auto& a : fleet.agents) before.push_back(snapshot(a->root(), kExclude));
  json r = run_campaign(fleet.hub, fleet.push(sign_manifest(manifest(2), op.compromised)), "env=it");
  INFO(r.dump(2));
  CHECK(r["counts"]["applied"] == 0);
  CHECK(r["failure_reasons"]["key_revoked"] == 2);
  for (size_t i = 0; i < fleet.agents.size(); ++i) {
    CHECK(snapshot(fleet.agents[i]->root(), kExclude) == before[i]);
    auto d = fleet.hub.device(fleet.agents[i]->device_id());
    CHECK(d["last_reason"] == "key_revoked");
    CHECK(d["applied_version"] == 1);
  }
}

TEST_CASE("an overlay selecting site=berlin places different files on the berlin device only",
          "[integration][trust][agent]") {
  TrustFleet fleet;
  auto& op = fleet.op;
  v1::Trust trust;
  *trust.mutable_signing() = signed_with(keyring(bundles::KeyringRole::signing, 1, {&op.signer}), {&op.root1});
  auto [st, body] = fleet.hub.call("PUT", "/v1/trust", trust.SerializeAsString(), "application/octet-stream");
  INFO(body.dump());
  REQUIRE(st == 200);

  auto m = manifest(1);
  auto* o = m.add_overlays();
  o->set_selector("site=berlin");
  *o->add_files() = make_file(v1::FILE_KIND_K3S_CONFIG, "50-edge.yaml", "node-label:\n  - \"tier=berlin\"\n");
  *o->add_files() = make_file(v1::FILE_KIND_MANIFEST, "berlin.yaml",
                         "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: berlin\n");
  json c = run_campaign(fleet.hub, fleet.push(sign_manifest(m, op.signer)), "env=it");
  INFO(c.dump(2));
  INFO(fleet.agents[0]->log());
  CHECK(c["counts"]["applied"] == 2);

  const auto& berlin = fleet.agents[0]->root();
  const auto& paris = fleet.agents[1]->root();
  const std::string config = "etc/rancher/k3s/config.yaml.d/50-edge.yaml";
  const std::string extra = "var/lib/rancher/k3s/server/manifests/berlin.yaml";
  CHECK(read(berlin / config) == "node-label:\n  - \"tier=berlin\"\n");
  CHECK(read(paris / config) == "node-label:\n  - \"tier=edge\"\n");
  CHECK(stdfs::exists(berlin / extra));
  CHECK_FALSE(stdfs::exists(paris / extra));
  // The shared base file is on both.
  CHECK(stdfs::exists(berlin / "var/lib/rancher/k3s/server/manifests/hello.yaml"));
  CHECK(stdfs::exists(paris / "var/lib/rancher/k3s/server/manifests/hello.yaml"));
}
