#pragma once
// Store-level steps the hub takes in two writes, for tests that drive a
// Store directly.
#include <string>

#include "flotilla/hub/store.hpp"

namespace flotilla::test {

// A decommission as the hub makes it: the directory's column, then the
// outbox followed in the same store (the reported state, presence and
// inventory; ADR 18).
inline Status decommission(hub::Store& s, const std::string& id) {
  if (auto m = s.mark_device_decommissioned(id); !m) return m;
  auto followed = hub::follow_directory_outbox(s, [&](int) -> hub::DeviceStore& { return s; });
  if (!followed) return followed.error();
  return {};
}

// Bundle "b1" as the store keeps it, for tests that need a campaign's
// record and its bundle (its envelope is one byte: no device is sent it).
inline hub::BundleRecord stand_in_bundle() {
  hub::BundleRecord b;
  b.id = "b1";
  b.digest = "b1digest";
  b.name = "edge";
  b.version = 1;
  b.envelope = "x";
  return b;
}

// A running campaign `id` of stand_in_bundle(), made at at_ms.
inline hub::CampaignRecord running_record(const std::string& id, int64_t at_ms) {
  hub::CampaignRecord c;
  c.id = id;
  c.bundle_id = "b1";
  c.state = hub::CampaignState::running;
  c.created_ms = c.updated_ms = at_ms;
  return c;
}

}  // namespace flotilla::test
