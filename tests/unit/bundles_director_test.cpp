// The director's signature on a desired state's per-device header
// (bundles/director.hpp): what the hub signs is exactly what the agent checks,
// and every way to get it wrong has its own reason.
#include <catch2/catch.hpp>

#include "flotilla/bundles/director.hpp"
#include "flotilla/bundles/keys.hpp"

namespace {
namespace b = flotilla::bundles;
namespace v1 = flotilla::v1;

b::KeyPair key(uint8_t n) { return *b::key_from_seed(flotilla::Bytes(32, n)); }

v1::DesiredHeader header() {
  v1::DesiredHeader h;
  h.set_device_id("d-1");
  h.set_generation(42);
  h.set_campaign_id("c-1");
  h.set_issued_unix_ms(1800000000000);
  h.set_rollback(true);
  h.set_manifest_sha256(std::string(32, '\x11'));
  h.set_artifact_base_url("https://hub.example/v1/artifacts/");
  (*h.mutable_labels())["tier"] = "prod";
  return h;
}
}  // namespace

TEST_CASE("a director-signed header verifies under its key and gives back every field", "[unit][bundles][director]") {
  const auto director = key(1);
  const auto signed_header = b::sign_desired_header(header(), director);
  CHECK(signed_header.key_id() == director.pub.key_id);
  CHECK(signed_header.signature().size() == 64);
  auto v = b::verify_desired_header(signed_header, director.pub);
  INFO(v.message);
  REQUIRE(v.ok());
  CHECK(v.header.SerializeAsString() == header().SerializeAsString());
  // Deterministic: the same header signs to the same bytes (Ed25519 is deterministic too).
  CHECK(b::sign_desired_header(header(), director).SerializeAsString() == signed_header.SerializeAsString());
  // The signed message is the header behind a fixed context string.
  CHECK(b::desired_header_message("abc") == "flotilla-desired-header-v1\nabc");
  CHECK(b::verify_detached(director.pub.key, b::desired_header_message(signed_header.header()),
                           flotilla::Bytes(signed_header.signature().begin(), signed_header.signature().end())));
}

TEST_CASE("a header that is unsigned, signed by another key, altered or oversized is refused with its reason",
          "[unit][bundles][director]") {
  const auto director = key(1), other = key(2);
  const auto good = b::sign_desired_header(header(), director);

  auto unsigned_header = good;
  unsigned_header.clear_signature();
  CHECK(b::verify_desired_header(unsigned_header, director.pub).reason == v1::REASON_DESIRED_UNSIGNED);

  const auto by_other = b::sign_desired_header(header(), other);
  auto v = b::verify_desired_header(by_other, director.pub);
  CHECK(v.reason == v1::REASON_DESIRED_BAD_SIGNATURE);
  CHECK(v.message.find(other.pub.key_id) != std::string::npos);

  auto claims_director = by_other;
  claims_director.set_key_id(director.pub.key_id);
  CHECK(b::verify_desired_header(claims_director, director.pub).reason == v1::REASON_DESIRED_BAD_SIGNATURE);

  auto altered = good;
  auto h = header();
  h.set_generation(43);
  altered.set_header(h.SerializeAsString());
  CHECK(b::verify_desired_header(altered, director.pub).reason == v1::REASON_DESIRED_BAD_SIGNATURE);

  auto flipped = good;
  (*flipped.mutable_signature())[5] ^= 1;
  CHECK(b::verify_desired_header(flipped, director.pub).reason == v1::REASON_DESIRED_BAD_SIGNATURE);

  auto huge = header();
  huge.set_campaign_id(std::string(b::kMaxDesiredHeaderBytes, 'c'));
  CHECK(b::verify_desired_header(b::sign_desired_header(huge, director), director.pub).reason ==
        v1::REASON_MALFORMED_DESIRED);

  // Signed, but not a header: refused after the signature, as malformed.
  v1::SignedDesiredHeader garbage;
  garbage.set_header("\xff\xff\xff");
  garbage.set_key_id(director.pub.key_id);
  const auto sig = b::sign_detached(director, b::desired_header_message(garbage.header()));
  garbage.set_signature(std::string(sig.begin(), sig.end()));
  CHECK(b::verify_desired_header(garbage, director.pub).reason == v1::REASON_MALFORMED_DESIRED);
}
