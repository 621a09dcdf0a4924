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

}  // namespace flotilla::test
