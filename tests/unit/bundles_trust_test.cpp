// [unit] tests for the trust model (bundles/trust.hpp): root and signing
// keyrings, root rotation, and one test per attack in TUF's threat list, each
// asserting the exact refusal reason and that the trust store did not change.
#include <catch2/catch.hpp>

#include "bundles_fixtures.hpp"
#include "flotilla/bundles/artifact.hpp"
#include "flotilla/bundles/trust.hpp"

namespace {

using namespace bundles_fixtures;

// Applies a Trust and requires the exact refusal, with the store unchanged:
// a refused update must lose nothing the device trusted before.
void require_update_refused(b::TrustStore& store, const v1::Trust& trust, const flotilla::Clock& clock,
                            v1::Reason reason) {
  const std::string before = store.serialize();
  auto v = store.update(trust, clock);
  INFO(v.message);
  CHECK(v.reason == reason);
  CHECK_FALSE(v.message.empty());
  CHECK(store.serialize() == before);
}

v1::Trust trust_of(std::vector<v1::SignedKeyring> roots, const v1::SignedKeyring* signing) {
  v1::Trust t;
  for (auto& r : roots) *t.add_roots() = std::move(r);
  if (signing) *t.mutable_signing() = *signing;
  return t;
}

}  // namespace

// ---------------------------------------------------------------- keyrings

TEST_CASE("keyring bytes are deterministic and round trip through a file", "[unit][bundles][trust]") {
  Fleet f;
  auto body = keyring(b::KeyringRole::root, 1, 2, {f.r1, f.r2, f.r3});
  CHECK(b::serialize_keyring(body) == b::serialize_keyring(body));
  TempDir tmp;
  REQUIRE(b::write_keyring_file(tmp.path() / "root.v1.krg", f.root_v1).ok());
  auto back = b::read_keyring_file(tmp.path() / "root.v1.krg");
  REQUIRE(back.ok());
  CHECK(back->keyring() == f.root_v1.keyring());
  CHECK(back->signatures_size() == 2);
  CHECK(b::keyring_digest_hex(*back) == b::keyring_digest_hex(f.root_v1));
}

TEST_CASE("parse_keyring_manifest refuses malformed keyrings with a clear message", "[unit][bundles][trust]") {
  Fleet f;
  auto check_refused = [](const v1::KeyringManifest& k, b::KeyringRole role, const std::string& needle) {
    auto r = b::parse_keyring_manifest(b::wrap_keyring(k), role);
    REQUIRE_FALSE(r.ok());
    INFO(r.error().message);
    CHECK(r.error().message.find(needle) != std::string::npos);
  };
  auto good = keyring(b::KeyringRole::root, 1, 2, {f.r1, f.r2, f.r3});
  REQUIRE(b::parse_keyring_manifest(b::wrap_keyring(good), b::KeyringRole::root).ok());

  check_refused(good, b::KeyringRole::signing, "expected a signing keyring");
  auto k = good;
  k.set_threshold(4);
  check_refused(k, b::KeyringRole::root, "needs 4 signatures but lists only 3");
  k = good;
  k.set_threshold(0);
  check_refused(k, b::KeyringRole::root, "threshold 0");
  k = good;
  k.set_expires_unix(0);
  check_refused(k, b::KeyringRole::root, "no expiry");
  k = good;
  k.set_version(0);
  check_refused(k, b::KeyringRole::root, "no version");
  k = good;
  k.mutable_keys(1)->set_key_id(k.keys(0).key_id());
  check_refused(k, b::KeyringRole::root, "does not match its public key");
  k = good;
  *k.add_keys() = k.keys(0);
  check_refused(k, b::KeyringRole::root, "listed twice");
  k = good;
  k.add_revoked_key_ids(f.r1.pub.key_id);
  check_refused(k, b::KeyringRole::root, "both trusted and revoked");
}

TEST_CASE("pin requires a root signed by its own threshold", "[unit][bundles][trust]") {
  Fleet f;
  auto one_sig = signed_with(keyring(b::KeyringRole::root, 1, 2, {f.r1, f.r2, f.r3}), {f.r1});
  auto r = b::TrustStore::pin(one_sig);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().message.find("1 valid signature(s) by its keys, 2 required") != std::string::npos);
  auto ok = b::TrustStore::pin(f.root_v1);
  REQUIRE(ok.ok());
  CHECK(ok->root_version() == 1);
  CHECK_FALSE(ok->has_signing());
}

TEST_CASE("trust state persists and restores, a damaged state is an error", "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.ready();
  const std::string state = store.serialize();
  auto back = b::TrustStore::restore(state);
  REQUIRE(back.ok());
  CHECK(back->root_version() == 1);
  CHECK(back->signing_version() == 1);
  CHECK(back->serialize() == state);
  // The restored store verifies like the original.
  auto bundle = signed_bundle(manifest(), {f.s1, f.s2});
  CHECK(back->verify(bundle, f.policy()).ok());

  // A state whose signing keyring was swapped for one the root never signed.
  v1::TrustState st;
  REQUIRE(st.ParseFromString(state));
  *st.mutable_signing() = signed_with(f.signing_v1_body, {f.s1, f.s2});
  auto bad = b::TrustStore::restore(st.SerializeAsString());
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.error().message.find("not signed by the root") != std::string::npos);
  CHECK_FALSE(b::TrustStore::restore("garbage").ok());
}

TEST_CASE("a store without a signing keyring refuses bundles: REASON_KEYRING_INVALID", "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.pinned();
  auto v = store.verify(signed_bundle(manifest(), {f.s1, f.s2}), f.policy());
  CHECK(v.reason == v1::REASON_KEYRING_INVALID);
}

// ---------------------------------------------------------------- rotation

TEST_CASE("root rotation: pinned to v1, follows v2 and v3, accepts a bundle signed under v3", "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.pinned();
  // v2 replaces R1 by R4; v3 replaces R2 by R5 and raises nothing else.
  const auto r4 = key(0x14), r5 = key(0x15);
  auto root_v2 = signed_with(keyring(b::KeyringRole::root, 2, 2, {f.r2, f.r3, r4}), {f.r1, f.r2, r4});
  auto root_v3 = signed_with(keyring(b::KeyringRole::root, 3, 2, {f.r3, r4, r5}), {f.r2, f.r3, r4, r5});
  // Signing keyring under v3: new signing keys T1, T2 (1 of 2), signed by R4 and R5 only,
  // keys that root v1 never knew.
  const auto t1 = key(0x31), t2 = key(0x32);
  auto signing = signed_with(keyring(b::KeyringRole::signing, 1, 1, {t1, t2}), {r4, r5});

  auto v = store.update(trust_of({root_v2, root_v3}, &signing), f.clock);
  INFO(v.message);
  REQUIRE(v.ok());
  CHECK(store.root_version() == 3);
  CHECK(store.signing_version() == 1);

  auto verdict = store.verify(signed_bundle(manifest(), {t2}), f.policy());
  INFO(verdict.message);
  CHECK(verdict.ok());
  CHECK(verdict.manifest.name() == "edge");

  // The chain may be sent whole each time: v1..v3 again is history, accepted.
  v = store.update(trust_of({f.root_v1, root_v2, root_v3}, &signing), f.clock);
  CHECK(v.ok());
  CHECK(store.root_version() == 3);

  // Restarting from the persisted state keeps v3.
  auto restored = b::TrustStore::restore(store.serialize());
  REQUIRE(restored.ok());
  CHECK(restored->root_version() == 3);
  CHECK(restored->verify(signed_bundle(manifest(), {t1}), f.policy()).ok());
}

TEST_CASE("root rotation attack: a new root not signed by the previous root's threshold is refused",
          "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.ready();
  const auto x1 = key(0x41), x2 = key(0x42);
  // Signed by its own (attacker) keys plus one old root key: 1 of the needed 2.
  auto evil_v2 = signed_with(keyring(b::KeyringRole::root, 2, 2, {x1, x2}), {x1, x2, f.r1});
  require_update_refused(store, trust_of({evil_v2}, nullptr), f.clock, v1::REASON_KEYRING_INVALID);
  auto v = store.update(trust_of({evil_v2}, nullptr), f.clock);
  CHECK(v.message.find("not signed by the threshold of root v1") != std::string::npos);
  CHECK(store.root_version() == 1);
  // Bundles signed under the old trust still verify: nothing was lost.
  CHECK(store.verify(signed_bundle(manifest(), {f.s1, f.s2}), f.policy()).ok());
}

TEST_CASE("root rotation: a new root not signed by its own threshold is refused", "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.ready();
  const auto r4 = key(0x14), r5 = key(0x15);
  // The old root approves, but the new keys never proved they are held.
  auto v2 = signed_with(keyring(b::KeyringRole::root, 2, 2, {r4, r5}), {f.r1, f.r2, r4});
  require_update_refused(store, trust_of({v2}, nullptr), f.clock, v1::REASON_KEYRING_INVALID);
  CHECK(store.update(trust_of({v2}, nullptr), f.clock).message.find("its own threshold") != std::string::npos);
}

TEST_CASE("root rotation: a gap in the chain is refused", "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.ready();
  auto v3 = signed_with(keyring(b::KeyringRole::root, 3, 2, {f.r1, f.r2, f.r3}), {f.r1, f.r2});
  require_update_refused(store, trust_of({v3}, nullptr), f.clock, v1::REASON_KEYRING_INVALID);
  CHECK(store.update(trust_of({v3}, nullptr), f.clock).message.find("gap") != std::string::npos);
}

TEST_CASE("rollback attack on the root: a chain ending below the trusted root is refused",
          "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.pinned();
  auto v2 = signed_with(keyring(b::KeyringRole::root, 2, 2, {f.r1, f.r2, f.r3}), {f.r1, f.r2});
  auto signing_v2root = signed_with(f.signing_v1_body, {f.r1, f.r2});
  REQUIRE(store.update(trust_of({v2}, &signing_v2root), f.clock).ok());
  REQUIRE(store.root_version() == 2);
  // A replayed old desired state carrying only root v1.
  require_update_refused(store, trust_of({f.root_v1}, &f.signing_v1), f.clock, v1::REASON_KEYRING_ROLLBACK);
  CHECK(store.root_version() == 2);
}

TEST_CASE("fork: a different root with the trusted root's version is refused", "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.ready();
  auto other_v1 = signed_with(keyring(b::KeyringRole::root, 1, 1, {f.r1, f.r2}), {f.r1});
  require_update_refused(store, trust_of({other_v1}, nullptr), f.clock, v1::REASON_KEYRING_INVALID);
}

TEST_CASE("root rotation revokes a compromised root key's signing keyring", "[unit][bundles][trust]") {
  Fleet f;
  // Signing keyring signed by R1 and R2; root v2 drops both (compromised).
  auto store = f.pinned();
  auto signing_by_r1r2 = signed_with(f.signing_v1_body, {f.r1, f.r2});
  REQUIRE(store.update(trust_of({}, &signing_by_r1r2), f.clock).ok());
  const auto r4 = key(0x14), r5 = key(0x15);
  auto v2 = signed_with(keyring(b::KeyringRole::root, 2, 2, {f.r3, r4, r5}), {f.r1, f.r3, r4, r5});
  // Rotating without re-signing the signing keyring under v2 is refused...
  require_update_refused(store, trust_of({v2}, nullptr), f.clock, v1::REASON_KEYRING_INVALID);
  // ...and accepted once v2's keys vouch for it (a new signing keyring version).
  auto body2 = f.signing_v1_body;
  body2.set_version(2);
  auto signing_v2 = signed_with(body2, {f.r3, r4});
  auto v = store.update(trust_of({v2}, &signing_v2), f.clock);
  INFO(v.message);
  CHECK(v.ok());
  CHECK(store.root_version() == 2);
  CHECK(store.signing_version() == 2);
}

TEST_CASE("intermediate roots may have expired, the newest must not: REASON_KEYRING_EXPIRED",
          "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.ready();
  // v2 expired long ago (the device was offline), v3 is current: accepted.
  auto v2 = signed_with(keyring(b::KeyringRole::root, 2, 2, {f.r1, f.r2, f.r3}, kNow - 100 * kDay), {f.r1, f.r2});
  auto v3 = signed_with(keyring(b::KeyringRole::root, 3, 2, {f.r1, f.r2, f.r3}), {f.r1, f.r2});
  auto signing = signed_with(f.signing_v1_body, {f.r1, f.r2});
  {
    auto copy = store;
    auto v = copy.update(trust_of({v2, v3}, &signing), f.clock);
    INFO(v.message);
    CHECK(v.ok());
    CHECK(copy.root_version() == 3);
  }
  // Ending at the expired v2 is refused (freeze attack on the root).
  require_update_refused(store, trust_of({v2}, &signing), f.clock, v1::REASON_KEYRING_EXPIRED);
}

// ------------------------------------------------- TUF attacks, one by one

TEST_CASE("arbitrary installation attack: an unsigned bundle is refused: REASON_UNSIGNED", "[unit][bundles][trust]") {
  Fleet f;
  auto v = f.ready().verify(b::wrap(manifest()), f.policy());
  CHECK(v.reason == v1::REASON_UNSIGNED);
}

TEST_CASE("arbitrary installation attack: a bundle signed by unknown keys is refused: REASON_UNKNOWN_KEY",
          "[unit][bundles][trust]") {
  Fleet f;
  // Signed by the root keys: they may sign keyrings, never bundles.
  auto v = f.ready().verify(signed_bundle(manifest(), {f.r1, f.r2}), f.policy());
  CHECK(v.reason == v1::REASON_UNKNOWN_KEY);
  CHECK(v.message.find(f.r1.pub.key_id) != std::string::npos);
}

TEST_CASE("arbitrary installation attack: a tampered manifest is refused: REASON_BAD_SIGNATURE",
          "[unit][bundles][trust]") {
  Fleet f;
  auto bundle = signed_bundle(manifest(), {f.s1, f.s2});
  auto m = manifest();
  m.mutable_files(0)->set_content("disable: []\n");
  m.mutable_files(0)->set_sha256(sha(m.files(0).content()));
  bundle.set_manifest(b::serialize_manifest(m));  // signatures kept, content changed
  auto v = f.ready().verify(bundle, f.policy());
  CHECK(v.reason == v1::REASON_BAD_SIGNATURE);
}

TEST_CASE("threshold attack: two signatures by one key count once: REASON_THRESHOLD_NOT_MET",
          "[unit][bundles][trust]") {
  Fleet f;
  auto bundle = signed_bundle(manifest(), {f.s1});
  *bundle.add_signatures() = bundle.signatures(0);  // the same key again, by hand
  REQUIRE(bundle.signatures_size() == 2);
  auto v = f.ready().verify(bundle, f.policy());
  CHECK(v.reason == v1::REASON_THRESHOLD_NOT_MET);
  CHECK(v.message.find("1 valid signature(s), 2 required") != std::string::npos);
}

TEST_CASE("key compromise: a revoked signing key's signatures are refused: REASON_KEY_REVOKED",
          "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.ready();
  // Signing keyring v2 revokes S1 (as `flotilla key revoke` writes it).
  auto body = f.signing_v1_body;
  body.set_version(2);
  body.clear_keys();
  *body.add_keys() = b::trusted_key(f.s2.pub);
  *body.add_keys() = b::trusted_key(f.s3.pub);
  body.add_revoked_key_ids(f.s1.pub.key_id);
  auto signing_v2 = signed_with(body, {f.r1, f.r2});
  REQUIRE(store.update(trust_of({}, &signing_v2), f.clock).ok());

  auto v = store.verify(signed_bundle(manifest(), {f.s1, f.s2}), f.policy());
  CHECK(v.reason == v1::REASON_KEY_REVOKED);
  CHECK(v.message.find(f.s1.pub.key_id) != std::string::npos);
  // Without the revoked key the threshold is met again.
  CHECK(store.verify(signed_bundle(manifest(), {f.s2, f.s3}), f.policy()).ok());
  // And a revoked key's extra signature does not spoil an otherwise good bundle.
  CHECK(store.verify(signed_bundle(manifest(), {f.s1, f.s2, f.s3}), f.policy()).ok());
}

TEST_CASE("rollback attack on keys: an older signing keyring that still trusts a revoked key is refused: "
          "REASON_KEYRING_ROLLBACK",
          "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.ready();
  auto body = f.signing_v1_body;
  body.set_version(2);
  body.clear_keys();
  *body.add_keys() = b::trusted_key(f.s2.pub);
  *body.add_keys() = b::trusted_key(f.s3.pub);
  body.add_revoked_key_ids(f.s1.pub.key_id);
  auto signing_v2 = signed_with(body, {f.r1, f.r2});
  REQUIRE(store.update(trust_of({}, &signing_v2), f.clock).ok());

  require_update_refused(store, trust_of({}, &f.signing_v1), f.clock, v1::REASON_KEYRING_ROLLBACK);
  CHECK(store.signing_version() == 2);
  CHECK(store.verify(signed_bundle(manifest(), {f.s1, f.s2}), f.policy()).reason == v1::REASON_KEY_REVOKED);
}

TEST_CASE("mix-and-match on keys: a different signing keyring with the trusted version is refused",
          "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.ready();
  auto body = f.signing_v1_body;
  body.set_threshold(1);  // same version, weaker rule
  auto forged = signed_with(body, {f.r1, f.r2});
  require_update_refused(store, trust_of({}, &forged), f.clock, v1::REASON_KEYRING_INVALID);
}

TEST_CASE("arbitrary keys: a signing keyring not signed by the root's threshold is refused",
          "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.pinned();
  auto one_root_sig = signed_with(f.signing_v1_body, {f.r1});
  require_update_refused(store, trust_of({}, &one_root_sig), f.clock, v1::REASON_KEYRING_INVALID);
  auto self_signed = signed_with(f.signing_v1_body, {f.s1, f.s2, f.s3});
  require_update_refused(store, trust_of({}, &self_signed), f.clock, v1::REASON_KEYRING_INVALID);
  CHECK_FALSE(store.has_signing());
}

TEST_CASE("cross-role replay: a signed bundle can not pose as a keyring", "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.ready();
  // A bundle signed by signing keys, re-wrapped as a "signing keyring".
  auto bundle = signed_bundle(manifest(2), {f.r1, f.r2});
  v1::SignedKeyring posed;
  posed.set_keyring(bundle.manifest());
  *posed.mutable_signatures() = bundle.signatures();
  require_update_refused(store, trust_of({}, &posed), f.clock, v1::REASON_KEYRING_INVALID);
}

TEST_CASE("key expiry: a signing key past its own expiry is refused: REASON_KEY_EXPIRED", "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.pinned();
  auto body = f.signing_v1_body;
  body.mutable_keys(0)->set_expires_unix(kNow - 1);  // S1 expired a second ago
  auto signing = signed_with(body, {f.r1, f.r2});
  REQUIRE(store.update(trust_of({}, &signing), f.clock).ok());
  auto v = store.verify(signed_bundle(manifest(), {f.s1, f.s2}), f.policy());
  CHECK(v.reason == v1::REASON_KEY_EXPIRED);
  CHECK(v.message.find(f.s1.pub.key_id) != std::string::npos);
  CHECK(store.verify(signed_bundle(manifest(), {f.s2, f.s3}), f.policy()).ok());
}

TEST_CASE("freeze attack: an expired bundle is refused: REASON_BUNDLE_EXPIRED", "[unit][bundles][trust]") {
  Fleet f;
  auto m = manifest();
  m.set_expires_unix(kNow);  // expires exactly now
  CHECK(f.ready().verify(signed_bundle(m, {f.s1, f.s2}), f.policy()).reason == v1::REASON_BUNDLE_EXPIRED);
  m.set_expires_unix(0);  // never expires: refused as well
  CHECK(f.ready().verify(signed_bundle(m, {f.s1, f.s2}), f.policy()).reason == v1::REASON_BUNDLE_EXPIRED);
}

TEST_CASE("freeze attack: an expired signing keyring refuses every bundle: REASON_KEYRING_EXPIRED",
          "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.ready();
  flotilla::FakeClock later(kNow + 91 * kDay);  // signing keyring v1 expires after 90 days
  auto p = f.policy();
  p.clock = &later;
  auto m = manifest();
  m.set_expires_unix(kNow + 200 * kDay);
  auto v = store.verify(signed_bundle(m, {f.s1, f.s2}), p);
  CHECK(v.reason == v1::REASON_KEYRING_EXPIRED);
  // And an update that keeps the stale keyring is refused too.
  require_update_refused(store, trust_of({}, &f.signing_v1), later, v1::REASON_KEYRING_EXPIRED);
}

TEST_CASE("freeze attack: an expired root refuses every bundle: REASON_KEYRING_EXPIRED", "[unit][bundles][trust]") {
  Fleet f;
  auto store = f.ready();
  flotilla::FakeClock much_later(kNow + 366 * kDay);  // root v1 expires after 365 days
  auto p = f.policy();
  p.clock = &much_later;
  auto m = manifest();
  m.set_expires_unix(kNow + 400 * kDay);
  auto v = store.verify(signed_bundle(m, {f.s1, f.s2}), p);
  CHECK(v.reason == v1::REASON_KEYRING_EXPIRED);
  CHECK(v.message.find("root v1") != std::string::npos);
}

TEST_CASE("rollback attack: a version not above the highest applied is refused: REASON_ROLLBACK_VERSION",
          "[unit][bundles][trust]") {
  Fleet f;
  auto p = f.policy();
  p.highest_applied = {{"stable", 5}};
  CHECK(f.ready().verify(signed_bundle(manifest(5), {f.s1, f.s2}), p).reason == v1::REASON_ROLLBACK_VERSION);
  CHECK(f.ready().verify(signed_bundle(manifest(4), {f.s1, f.s2}), p).reason == v1::REASON_ROLLBACK_VERSION);
  CHECK(f.ready().verify(signed_bundle(manifest(6), {f.s1, f.s2}), p).ok());
  // Another channel keeps its own counter.
  auto m = manifest(1);
  m.set_channel("beta");
  CHECK(f.ready().verify(signed_bundle(m, {f.s1, f.s2}), p).ok());
}

TEST_CASE("wrong target: a bundle for another arch is refused: REASON_WRONG_ARCH", "[unit][bundles][trust]") {
  Fleet f;
  auto p = f.policy();
  p.arch = "arm";
  CHECK(f.ready().verify(signed_bundle(manifest(), {f.s1, f.s2}), p).reason == v1::REASON_WRONG_ARCH);
}

TEST_CASE("wrong target: a bundle for other labels is refused: REASON_LABEL_MISMATCH", "[unit][bundles][trust]") {
  Fleet f;
  auto m = manifest();
  (*m.mutable_target()->mutable_labels())["site"] = "paris";
  auto p = f.policy();
  p.check_labels = true;
  p.labels = {{"site", "berlin"}};
  CHECK(f.ready().verify(signed_bundle(m, {f.s1, f.s2}), p).reason == v1::REASON_LABEL_MISMATCH);
  p.labels = {{"site", "paris"}};
  CHECK(f.ready().verify(signed_bundle(m, {f.s1, f.s2}), p).ok());
}

TEST_CASE("endless data: a manifest above the size cap is refused: REASON_MANIFEST_TOO_LARGE",
          "[unit][bundles][trust]") {
  Fleet f;
  auto m = manifest();
  m.set_description(std::string(2000, 'x'));
  auto p = f.policy();
  p.max_manifest_bytes = 1024;
  CHECK(f.ready().verify(signed_bundle(m, {f.s1, f.s2}), p).reason == v1::REASON_MANIFEST_TOO_LARGE);
}

TEST_CASE("endless data: an artifact stream past its signed size is cut off: REASON_ARTIFACT_SIZE",
          "[unit][bundles][trust]") {
  const std::string content = "0123456789";
  v1::Artifact a;
  a.set_name("k3s");
  a.set_kind(v1::ARTIFACT_KIND_K3S_BINARY);
  a.set_sha256(sha(content));
  a.set_size(content.size());
  b::ArtifactChecker c(a);
  CHECK(c.feed("01234") == v1::REASON_NONE);
  CHECK(c.feed("56789") == v1::REASON_NONE);
  // The 11th byte is refused at once, before any hashing or finish().
  CHECK(c.feed("X") == v1::REASON_ARTIFACT_SIZE);
  CHECK(c.feed("more") == v1::REASON_ARTIFACT_SIZE);  // stays refused
  CHECK(c.finish() == v1::REASON_ARTIFACT_SIZE);
  CHECK(c.message().find("more than the signed 10 bytes") != std::string::npos);

  b::ArtifactChecker short_one(a);
  CHECK(short_one.feed("01234") == v1::REASON_NONE);
  CHECK(short_one.finish() == v1::REASON_ARTIFACT_SIZE);

  b::ArtifactChecker good(a);
  CHECK(good.feed("0123") == v1::REASON_NONE);
  CHECK(good.feed("456789") == v1::REASON_NONE);
  CHECK(good.finish() == v1::REASON_NONE);
  CHECK(good.received() == 10);
}

TEST_CASE("mix-and-match: an artifact with the right size but other bytes is refused: REASON_ARTIFACT_HASH",
          "[unit][bundles][trust]") {
  v1::Artifact a;
  a.set_name("airgap.tar.zst");
  a.set_kind(v1::ARTIFACT_KIND_AIRGAP_IMAGES);
  a.set_sha256(sha("images-v2"));
  a.set_size(9);
  b::ArtifactChecker c(a);
  CHECK(c.feed("images-v1") == v1::REASON_NONE);  // an older artifact of the same size
  CHECK(c.finish() == v1::REASON_ARTIFACT_HASH);
  CHECK(c.message().find("differs from the signed") != std::string::npos);
}

TEST_CASE("artifact_url resolves relative urls against the hub's artifact base", "[unit][bundles][trust]") {
  v1::Artifact a;
  a.set_url(flotilla::crypto::sha256_hex("x"));
  CHECK(b::artifact_url(a, "https://hub:8443/v1/artifacts/") ==
        "https://hub:8443/v1/artifacts/" + flotilla::crypto::sha256_hex("x"));
  a.set_url("https://mirror.example/k3s");
  CHECK(b::artifact_url(a, "https://hub/v1/artifacts") == "https://mirror.example/k3s");
}

TEST_CASE("a validly signed manifest with a broken overlay or artifact is refused: REASON_MALFORMED_MANIFEST",
          "[unit][bundles][trust]") {
  Fleet f;
  auto m = manifest();
  m.add_overlays()->set_selector("site in (berlin");
  CHECK(f.ready().verify(signed_bundle(m, {f.s1, f.s2}), f.policy()).reason == v1::REASON_MALFORMED_MANIFEST);

  m = manifest();
  auto* a = m.add_artifacts();
  a->set_name("k3s");
  a->set_kind(v1::ARTIFACT_KIND_K3S_BINARY);
  a->set_sha256("short");
  a->set_size(1);
  a->set_url("abc");
  CHECK(f.ready().verify(signed_bundle(m, {f.s1, f.s2}), f.policy()).reason == v1::REASON_MALFORMED_MANIFEST);

  m = manifest();
  (*m.add_overlays()->mutable_k3s_config())["node-label"] = "a\nwrite-kubeconfig-mode: 0777";
  CHECK(f.ready().verify(signed_bundle(m, {f.s1, f.s2}), f.policy()).reason == v1::REASON_MALFORMED_MANIFEST);
}
