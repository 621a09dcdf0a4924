// TUF's threat list, attack by attack, against the agent core itself: each
// malicious desired state is refused with its exact reason, and the device
// is left exactly as it was — files (including trust.pb), persisted state,
// the applied bundle and the running k3s. bundles_trust_test.cpp covers the
// same attacks at the library's level; this proves the agent wires every
// verdict through before it writes anything. Artifact attacks (wrong hash,
// past the signed size) are in agent_pipeline_test.cpp.
//
// Then Uptane's director split: whoever can publish on the device's desired
// topic (a broker or hub account, or an on-path attacker while MQTT is plain)
// but does not hold the hub's director key can change none of the fields
// that decide what is installed or accepted later.
#include <catch2/catch.hpp>

#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "bundles_fixtures.hpp"
#include "edge-agent/testing/desired.hpp"
#include "edge-agent/testing/fakes.hpp"
#include "flotilla/agent/agent.hpp"
#include "flotilla/v1/desired.pb.h"

namespace {

using namespace bundles_fixtures;
using flotilla::agent::Agent;
using flotilla::agent::CoreConfig;
using flotilla::agent::testing::FakeK3sRuntime;
using flotilla::agent::testing::MemFileTree;
using flotilla::agent::testing::MemStateStore;

// The device's whole tree, one line per file, so a failure shows what moved.
std::string render(const MemFileTree& t) {
  std::string out;
  for (const auto& [path, e] : t.files) {
    char mode[16];
    std::snprintf(mode, sizeof mode, "%04o", e.mode);
    out += path + " mode=" + mode + " sha=" + flotilla::crypto::sha256_hex(e.content) + "\n";
  }
  return out;
}

// Generations: the device finished kApplied; an honest next message is kNext.
constexpr uint64_t kApplied = 10;
constexpr uint64_t kNext = 11;

// A device pinned to root v1 and to the hub's director key, that has applied
// `edge` v5 (signed by S2+S3) at generation kApplied together with signing
// keyring v2: S1 revoked, S3 expiring in two days.
struct Device {
  Fleet f;
  b::KeyPair director = key(0x44);
  FakeK3sRuntime runtime;
  MemFileTree files;
  MemStateStore store;
  std::vector<v1::Report> reports;
  std::unique_ptr<Agent> agent;
  v1::SignedKeyring signing_v2;

  Device() {
    auto body = f.signing_v1_body;
    body.set_version(2);
    body.clear_keys();
    *body.add_keys() = b::trusted_key(f.s2.pub);
    auto s3 = b::trusted_key(f.s3.pub);
    s3.set_expires_unix(kNow + 2 * kDay);
    *body.add_keys() = s3;
    body.add_revoked_key_ids(f.s1.pub.key_id);
    signing_v2 = signed_with(body, {f.r1, f.r2});

    CoreConfig cfg;
    cfg.device_id = "d-attacked";
    cfg.arch = "amd64";
    cfg.labels = {{"site", "berlin"}};
    cfg.trust = f.pinned();
    cfg.director_key = director.pub;
    cfg.health_timeout = std::chrono::milliseconds(50);
    cfg.health_poll = std::chrono::milliseconds(1);
    cfg.min_free_bytes = 4096;
    agent = std::make_unique<Agent>(cfg, runtime, files, store, f.clock,
                                    [this](v1::Report&& r) { reports.push_back(std::move(r)); });
    REQUIRE(agent->start());

    v1::Trust trust;
    *trust.mutable_signing() = signing_v2;
    agent->handle_desired(desired(signed_bundle(manifest(5), {f.s2, f.s3}), kApplied, &trust));
    REQUIRE(!reports.empty());
    INFO(reports.back().error().message());
    REQUIRE(reports.back().state() == v1::AGENT_STATE_APPLIED);
    REQUIRE(agent->applied().version == 5);
    REQUIRE(agent->applied().director_generation == kApplied);
    reports.clear();
  }

  // What the hub sends: the fields, and the same fields in a header signed by
  // the director key. `edit` changes the message after signing (an attacker
  // on the topic); `edit_header` before (what the director signed).
  v1::DesiredState message(const v1::SignedBundle& bundle, uint64_t generation, const v1::Trust* trust = nullptr,
                           const std::function<void(v1::DesiredHeader&)>& edit_header = nullptr) const {
    v1::DesiredState ds;
    ds.set_device_id("d-attacked");
    ds.set_generation(generation);
    ds.set_campaign_id("c-attack");
    *ds.mutable_bundle() = bundle;
    if (trust) *ds.mutable_trust() = *trust;
    ds.set_issued_unix_ms(1);
    ds.set_artifact_base_url("https://hub.example/v1/artifacts/");
    auto h = flotilla::agent::testing::header_of(ds);
    if (edit_header) edit_header(h);
    *ds.mutable_header() = b::sign_desired_header(h, director);
    return ds;
  }
  std::string desired(const v1::SignedBundle& bundle, uint64_t generation, const v1::Trust* trust = nullptr) const {
    return message(bundle, generation, trust).SerializeAsString();
  }
};

struct Attack {
  std::string name;
  v1::Reason reason;
  // Builds the malicious desired state; may move the device's clock.
  std::function<std::string(Device&)> payload;
  uint64_t reported_generation = kNext;  // the generation the refusal names
};

// A manifest the device would accept but for the one thing the attack changes.
v1::BundleManifest next(uint64_t version = 6) {
  auto m = manifest(version);
  m.set_expires_unix(kNow + 200 * kDay);
  return m;
}

std::vector<Attack> attacks() {
  return {
      {"arbitrary installation: unsigned", v1::REASON_UNSIGNED,
       [](Device& d) { return d.desired(b::wrap(next()), kNext); }},
      {"arbitrary installation: signed by keys that may not sign bundles (root keys)", v1::REASON_UNKNOWN_KEY,
       [](Device& d) { return d.desired(signed_bundle(next(), {d.f.r1, d.f.r2}), kNext); }},
      {"arbitrary installation: signed by a stranger", v1::REASON_UNKNOWN_KEY,
       [](Device& d) { return d.desired(signed_bundle(next(), {key(0x66), key(0x67)}), kNext); }},
      {"arbitrary installation: manifest changed after signing", v1::REASON_BAD_SIGNATURE,
       [](Device& d) {
         auto bundle = signed_bundle(next(), {d.f.s2, d.f.s3});
         auto evil = next();
         *evil.add_files() = file(v1::FILE_KIND_MANIFEST, "evil.yaml", "kind: Pod\n");
         bundle.set_manifest(b::serialize_manifest(evil));
         return d.desired(bundle, kNext);
       }},
      {"fewer keys than the threshold: one signature", v1::REASON_THRESHOLD_NOT_MET,
       [](Device& d) { return d.desired(signed_bundle(next(), {d.f.s2}), kNext); }},
      {"fewer keys than the threshold: one key's signature twice", v1::REASON_THRESHOLD_NOT_MET,
       [](Device& d) {
         auto bundle = signed_bundle(next(), {d.f.s2});
         *bundle.add_signatures() = bundle.signatures(0);
         return d.desired(bundle, kNext);
       }},
      {"key compromise: signed with a revoked key", v1::REASON_KEY_REVOKED,
       [](Device& d) { return d.desired(signed_bundle(next(), {d.f.s1, d.f.s2}), kNext); }},
      {"key compromise: signed with a key past its expiry", v1::REASON_KEY_EXPIRED,
       [](Device& d) {
         d.f.clock.set_unix(kNow + 3 * kDay);
         return d.desired(signed_bundle(next(), {d.f.s2, d.f.s3}), kNext);
       }},
      {"indefinite freeze: an expired bundle", v1::REASON_BUNDLE_EXPIRED,
       [](Device& d) {
         auto m = next();
         m.set_expires_unix(kNow);
         return d.desired(signed_bundle(m, {d.f.s2, d.f.s3}), kNext);
       }},
      {"indefinite freeze: the signing keyring has expired", v1::REASON_KEYRING_EXPIRED,
       [](Device& d) {
         d.f.clock.set_unix(kNow + 91 * kDay);
         return d.desired(signed_bundle(next(), {d.f.s2, d.f.s3}), kNext);
       }},
      {"rollback: a lower version", v1::REASON_ROLLBACK_VERSION,
       [](Device& d) { return d.desired(signed_bundle(next(4), {d.f.s2, d.f.s3}), kNext); }},
      {"rollback: other content under the applied version", v1::REASON_ROLLBACK_VERSION,
       [](Device& d) { return d.desired(signed_bundle(next(5), {d.f.s2, d.f.s3}), kNext); }},
      {"wrong software: a bundle for another arch", v1::REASON_WRONG_ARCH,
       [](Device& d) {
         auto m = next();
         m.mutable_target()->clear_arch();
         m.mutable_target()->add_arch("arm64");
         return d.desired(signed_bundle(m, {d.f.s2, d.f.s3}), kNext);
       }},
      {"wrong software: a bundle for other labels", v1::REASON_LABEL_MISMATCH,
       [](Device& d) {
         auto m = next();
         (*m.mutable_target()->mutable_labels())["site"] = "paris";
         return d.desired(signed_bundle(m, {d.f.s2, d.f.s3}), kNext);
       }},
      {"endless data: a manifest above the size cap", v1::REASON_MANIFEST_TOO_LARGE,
       [](Device& d) {
         auto m = next();
         m.set_description(std::string(b::kMaxManifestBytes, 'x'));
         return d.desired(signed_bundle(m, {d.f.s2, d.f.s3}), kNext);
       }},
      {"extraneous dependencies: a signed artifact with no hash", v1::REASON_MALFORMED_MANIFEST,
       [](Device& d) {
         auto m = next();
         auto* a = m.add_artifacts();
         a->set_name("k3s");
         a->set_kind(v1::ARTIFACT_KIND_K3S_BINARY);
         a->set_url("k3s");
         a->set_size(100);
         return d.desired(signed_bundle(m, {d.f.s2, d.f.s3}), kNext);
       }},
      {"rollback on keys: the older keyring that still trusts the revoked key", v1::REASON_KEYRING_ROLLBACK,
       [](Device& d) {
         v1::Trust t;
         *t.mutable_signing() = d.f.signing_v1;
         return d.desired(signed_bundle(next(), {d.f.s1, d.f.s2}), kNext, &t);
       }},
      {"arbitrary keys: a signing keyring signed by one root key of two needed", v1::REASON_KEYRING_INVALID,
       [](Device& d) {
         auto body = d.f.signing_v1_body;
         body.set_version(3);
         body.set_threshold(1);
         *body.add_keys() = b::trusted_key(key(0x66).pub);
         v1::Trust t;
         *t.mutable_signing() = signed_with(body, {d.f.r1});
         return d.desired(signed_bundle(next(), {key(0x66)}), kNext, &t);
       }},
      {"arbitrary keys: a root rotation not signed by the trusted root", v1::REASON_KEYRING_INVALID,
       [](Device& d) {
         auto evil_root = keyring(b::KeyringRole::root, 2, 1, {key(0x77)});
         v1::Trust t;
         *t.add_roots() = signed_with(evil_root, {key(0x77)});
         return d.desired(signed_bundle(next(), {d.f.s2, d.f.s3}), kNext, &t);
       }},
      // ---- values from signed bundles, range-checked where stored or compared ----
      {"rollback across channels: a still-valid bundle of another channel", v1::REASON_CHANNEL_SWITCH,
       [](Device& d) {
         auto m = next(1);
         m.set_channel("beta");  // no floor there yet: version 1 would pass a per-channel check
         return d.desired(signed_bundle(m, {d.f.s2, d.f.s3}), kNext);
       }},
      {"rollback across channels: a channel switch that names another channel", v1::REASON_CHANNEL_SWITCH,
       [](Device& d) {
         auto m = next(1);
         m.set_channel("beta");
         m.add_switch_from_channels("edge-lab");
         return d.desired(signed_bundle(m, {d.f.s2, d.f.s3}), kNext);
       }},
      {"a version above 2^63 (its floor would not survive a restart)", v1::REASON_MALFORMED_MANIFEST,
       [](Device& d) { return d.desired(signed_bundle(next(uint64_t{1} << 63), {d.f.s2, d.f.s3}), kNext); }},
      {"a world-writable manifest in k3s's auto-deploy directory", v1::REASON_UNSAFE_FILE_MODE,
       [](Device& d) {
         auto m = next();
         auto f = file(v1::FILE_KIND_MANIFEST, "app.yaml", "kind: ConfigMap\n");
         f.set_mode(0666);
         *m.add_files() = f;
         return d.desired(signed_bundle(m, {d.f.s2, d.f.s3}), kNext);
       }},
      {"a group-writable k3s config drop-in", v1::REASON_UNSAFE_FILE_MODE,
       [](Device& d) {
         auto m = next();
         m.mutable_files(0)->set_mode(0664);
         return d.desired(signed_bundle(m, {d.f.s2, d.f.s3}), kNext);
       }},
      {"a setuid file", v1::REASON_UNSAFE_FILE_MODE,
       [](Device& d) {
         auto m = next();
         m.mutable_files(0)->set_mode(04755);
         return d.desired(signed_bundle(m, {d.f.s2, d.f.s3}), kNext);
       }},
      {"a world-writable file in an overlay", v1::REASON_UNSAFE_FILE_MODE,
       [](Device& d) {
         auto m = next();
         auto* o = m.add_overlays();
         o->set_selector("site=berlin");
         auto f = file(v1::FILE_KIND_MANIFEST, "app.yaml", "kind: ConfigMap\n");
         f.set_mode(0646);
         *o->add_files() = f;
         return d.desired(signed_bundle(m, {d.f.s2, d.f.s3}), kNext);
       }},
      // ---- the director split: fields no bundle signature covers ----
      {"unsigned desired state on a device that pins the director key", v1::REASON_DESIRED_UNSIGNED,
       [](Device& d) {
         auto ds = d.message(signed_bundle(next(), {d.f.s2, d.f.s3}), kNext);
         ds.clear_header();
         return ds.SerializeAsString();
       }},
      {"header signed by another key", v1::REASON_DESIRED_BAD_SIGNATURE,
       [](Device& d) {
         auto ds = d.message(signed_bundle(next(), {d.f.s2, d.f.s3}), kNext);
         *ds.mutable_header() = b::sign_desired_header(flotilla::agent::testing::header_of(ds), key(0x45));
         return ds.SerializeAsString();
       }},
      {"header naming the director's key id, signed by another key", v1::REASON_DESIRED_BAD_SIGNATURE,
       [](Device& d) {
         auto ds = d.message(signed_bundle(next(), {d.f.s2, d.f.s3}), kNext);
         *ds.mutable_header() = b::sign_desired_header(flotilla::agent::testing::header_of(ds), key(0x45));
         ds.mutable_header()->set_key_id(d.director.pub.key_id);
         return ds.SerializeAsString();
       }},
      {"header bytes changed after signing (a larger generation)", v1::REASON_DESIRED_BAD_SIGNATURE,
       [](Device& d) {
         auto ds = d.message(signed_bundle(next(), {d.f.s2, d.f.s3}), kNext);
         v1::DesiredHeader h;
         REQUIRE(h.ParseFromString(ds.header().header()));
         h.set_generation(uint64_t{1} << 62);
         ds.mutable_header()->set_header(h.SerializeAsString());
         ds.set_generation(uint64_t{1} << 62);
         return ds.SerializeAsString();
       }, uint64_t{1} << 62},
      {"freeze: a huge generation outside the signed header", v1::REASON_DESIRED_MISMATCH,
       [](Device& d) {
         auto ds = d.message(signed_bundle(next(), {d.f.s2, d.f.s3}), kNext);
         ds.set_generation(INT64_MAX);
         return ds.SerializeAsString();
       }},
      {"flip: rollback set outside the signed header", v1::REASON_DESIRED_MISMATCH,
       [](Device& d) {
         auto ds = d.message(signed_bundle(next(), {d.f.s2, d.f.s3}), kNext);
         ds.set_rollback(true);
         return ds.SerializeAsString();
       }},
      {"another campaign outside the signed header", v1::REASON_DESIRED_MISMATCH,
       [](Device& d) {
         auto ds = d.message(signed_bundle(next(), {d.f.s2, d.f.s3}), kNext);
         ds.set_campaign_id("c-evil");
         return ds.SerializeAsString();
       }},
      {"artifacts from another server, outside the signed header", v1::REASON_DESIRED_MISMATCH,
       [](Device& d) {
         auto ds = d.message(signed_bundle(next(), {d.f.s2, d.f.s3}), kNext);
         ds.set_artifact_base_url("http://evil.example/");
         return ds.SerializeAsString();
       }},
      {"mix-and-match: another valid bundle under a signed header", v1::REASON_DESIRED_MISMATCH,
       [](Device& d) {
         auto ds = d.message(signed_bundle(next(6), {d.f.s2, d.f.s3}), kNext);
         *ds.mutable_bundle() = signed_bundle(next(7), {d.f.s2, d.f.s3});
         return ds.SerializeAsString();
       }},
      {"a signed header for another device", v1::REASON_WRONG_DEVICE,
       [](Device& d) {
         auto ds = d.message(signed_bundle(next(), {d.f.s2, d.f.s3}), kNext, nullptr,
                             [](v1::DesiredHeader& h) { h.set_device_id("d-other"); });
         ds.clear_device_id();
         return ds.SerializeAsString();
       }},
      {"replay: an older signed generation", v1::REASON_DESIRED_REPLAY,
       [](Device& d) { return d.desired(signed_bundle(next(), {d.f.s2, d.f.s3}), kApplied - 1); },
       kApplied - 1},
      {"a signed generation that could not be stored", v1::REASON_MALFORMED_DESIRED,
       [](Device& d) {
         auto ds = d.message(signed_bundle(next(), {d.f.s2, d.f.s3}), 0, nullptr,
                             [](v1::DesiredHeader& h) { h.set_generation(UINT64_MAX); });
         return ds.SerializeAsString();
       }, UINT64_MAX},
      {"a signed rollback to a bundle this device never ran", v1::REASON_ROLLBACK_TARGET,
       [](Device& d) {
         auto ds = d.message(signed_bundle(next(4), {d.f.s2, d.f.s3}), kNext, nullptr,
                             [](v1::DesiredHeader& h) { h.set_rollback(true); });
         return ds.SerializeAsString();
       }},
  };
}

}  // namespace

TEST_CASE("every TUF attack is refused by the agent with its reason, and the device is left as it was",
          "[unit][agent][trust]") {
  for (const auto& attack : attacks()) {
    DYNAMIC_SECTION(attack.name) {
      Device d;
      const std::string tree = render(d.files);
      REQUIRE(tree.find("trust.pb") != std::string::npos);  // signing v2 was persisted
      const int saves = d.store.saves;
      const int restarts = d.runtime.restarts;

      d.agent->handle_desired(attack.payload(d));

      REQUIRE_FALSE(d.reports.empty());
      const auto& last = d.reports.back();
      INFO(last.error().message());
      CHECK(last.state() == v1::AGENT_STATE_REFUSED);
      CHECK(last.error().reason() == attack.reason);
      CHECK_FALSE(last.error().message().empty());
      CHECK(last.generation() == attack.reported_generation);
      // Nothing written, nothing restarted, nothing forgotten.
      CHECK(render(d.files) == tree);
      CHECK(d.store.saves == saves);
      CHECK(d.runtime.restarts == restarts);
      CHECK(d.agent->applied().version == 5);
      CHECK(d.agent->applied().highest_version.at("stable") == 5);
      CHECK(d.agent->applied().highest_version.size() == 1);
      CHECK(d.agent->applied().channel == "stable");
      CHECK(d.agent->applied().generation == kApplied);
      CHECK(d.agent->applied().director_generation == kApplied);
      CHECK(d.store.state.generation == kApplied);
      for (const auto& r : d.reports) CHECK(r.state() != v1::AGENT_STATE_INSTALLING);
      // The honest message still goes through afterwards: nothing was frozen.
      d.f.clock.set_unix(kNow);
      d.reports.clear();
      d.agent->handle_desired(d.desired(signed_bundle(next(), {d.f.s2, d.f.s3}), kNext));
      REQUIRE_FALSE(d.reports.empty());
      INFO(d.reports.back().error().message());
      CHECK(d.reports.back().state() == v1::AGENT_STATE_APPLIED);
    }
  }
}

TEST_CASE("the attack rig's device accepts the honest next version", "[unit][agent][trust]") {
  // So every refusal above is down to the attack, not to a rig that refuses everything.
  Device d;
  d.agent->handle_desired(d.desired(signed_bundle(next(), {d.f.s2, d.f.s3}), kNext));
  REQUIRE_FALSE(d.reports.empty());
  INFO(d.reports.back().error().message());
  CHECK(d.reports.back().state() == v1::AGENT_STATE_APPLIED);
  CHECK(d.agent->applied().version == 6);
  CHECK(d.agent->applied().director_generation == kNext);
  // The retained message again (a reconnect): silently nothing to do.
  d.reports.clear();
  const int saves = d.store.saves;
  d.agent->handle_desired(d.desired(signed_bundle(next(), {d.f.s2, d.f.s3}), kNext));
  CHECK(d.reports.empty());
  CHECK(d.store.saves == saves);
}

TEST_CASE("the attack rig's device takes a signed, explicit channel switch and keeps both floors",
          "[unit][agent][trust]") {
  Device d;
  auto m = next(1);
  m.set_channel("beta");
  m.add_switch_from_channels("stable");
  d.agent->handle_desired(d.desired(signed_bundle(m, {d.f.s2, d.f.s3}), kNext));
  REQUIRE_FALSE(d.reports.empty());
  INFO(d.reports.back().error().message());
  REQUIRE(d.reports.back().state() == v1::AGENT_STATE_APPLIED);
  CHECK(d.agent->applied().channel == "beta");
  CHECK(d.agent->applied().highest_version.at("stable") == 5);
  CHECK(d.agent->applied().highest_version.at("beta") == 1);
  // Back to stable needs a stable bundle that names beta, above stable's floor.
  auto back = next(5);
  back.add_switch_from_channels("beta");
  d.agent->handle_desired(d.desired(signed_bundle(back, {d.f.s2, d.f.s3}), kNext + 1));
  CHECK(d.reports.back().error().reason() == v1::REASON_ROLLBACK_VERSION);
  back.set_version(6);
  d.agent->handle_desired(d.desired(signed_bundle(back, {d.f.s2, d.f.s3}), kNext + 2));
  CHECK(d.reports.back().state() == v1::AGENT_STATE_APPLIED);
  CHECK(d.agent->applied().channel == "stable");
}
