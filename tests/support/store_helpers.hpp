#pragma once
// Store-level steps the hub takes in two writes, for tests that drive a
// Store directly.
#include <catch2/catch.hpp>

#include <filesystem>
#include <memory>
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
// Cell `cell`'s own device file under root/cells/<cell>/devices.db (ADR 18),
// as a hub started with --cell-files opens it.
inline std::unique_ptr<hub::Store> open_cell_file(const std::filesystem::path& root, int cell) {
  const auto dir = root / "cells" / std::to_string(cell);
  std::filesystem::create_directories(dir);
  auto f = hub::Store::open_cell((dir / "devices.db").string(), cell);
  REQUIRE(f);
  return std::move(*f);
}

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
