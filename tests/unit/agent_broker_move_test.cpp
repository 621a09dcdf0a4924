// A cell drain moves a device to another broker only through a header the
// hub's director key signed for it (docs/agent.md, "Moving to another broker").
#include <catch2/catch.hpp>

#include "flotilla/agent/agent.hpp"
#include "flotilla/bundles/director.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/v1/desired.pb.h"

namespace {
namespace b = flotilla::bundles;
namespace v1 = flotilla::v1;
using flotilla::agent::decide_desired;
using flotilla::agent::DesiredContext;
using flotilla::agent::DesiredDecision;

// A move alone (generation 0, no bundle), as the hub sends a device that
// never had a desired state; signed by `by`.
std::string move_message(const std::string& device, const std::string& url, const b::KeyPair& by,
                         uint64_t generation = 0) {
  v1::DesiredHeader h;
  h.set_device_id(device);
  h.set_generation(generation);
  h.set_issued_unix_ms(1700000000000);
  h.set_broker_url(url);
  const auto digest = flotilla::crypto::sha256(std::string());
  h.set_manifest_sha256(std::string(digest.begin(), digest.end()));
  v1::DesiredState ds;
  ds.set_device_id(device);
  *ds.mutable_header() = b::sign_desired_header(h, by);
  return ds.SerializeAsString();
}

}  // namespace

TEST_CASE("a signed move is taken and an unsigned or foreign or other device's one is refused",
          "[unit][agent][cells]") {
  const auto director = b::generate_key(), other = b::generate_key();
  DesiredContext ctx{"dev-1", &director.pub, 5, 5};

  auto ok = decide_desired(move_message("dev-1", "ssl://cell1:8884", director), ctx);
  CHECK(ok.action == DesiredDecision::Action::ignore);  // nothing to apply
  CHECK(ok.broker_url == "ssl://cell1:8884");
  CHECK(ok.move_issued_ms == 1700000000000);

  // The same header with the device's current (handled) generation: still a move.
  v1::DesiredHeader h;
  h.set_device_id("dev-1");
  h.set_generation(5);
  h.set_issued_unix_ms(1700000000001);
  h.set_broker_url("ssl://cell2:8885");
  const auto digest = flotilla::crypto::sha256(std::string());
  h.set_manifest_sha256(std::string(digest.begin(), digest.end()));
  v1::DesiredState again;
  *again.mutable_header() = b::sign_desired_header(h, director);
  auto handled = decide_desired(again.SerializeAsString(), ctx);
  CHECK(handled.action == DesiredDecision::Action::ignore);
  CHECK(handled.broker_url == "ssl://cell2:8885");

  auto forged = decide_desired(move_message("dev-1", "ssl://evil:8883", other), ctx);
  CHECK(forged.action == DesiredDecision::Action::refuse);
  CHECK(forged.broker_url.empty());

  auto wrong_device = decide_desired(move_message("dev-2", "ssl://evil:8883", director), ctx);
  CHECK(wrong_device.action == DesiredDecision::Action::refuse);
  CHECK(wrong_device.broker_url.empty());

  // Unsigned: the header's signature removed.
  v1::DesiredState bare;
  REQUIRE(bare.ParseFromString(move_message("dev-1", "ssl://evil:8883", director)));
  bare.mutable_header()->clear_signature();
  auto unsigned_move = decide_desired(bare.SerializeAsString(), ctx);
  CHECK(unsigned_move.action == DesiredDecision::Action::refuse);
  CHECK(unsigned_move.broker_url.empty());
}
