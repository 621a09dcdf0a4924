#pragma once
// Desired-state messages as the hub makes them, for tests and the fuzz entry:
// the per-device fields copied into a header signed by a director key
// (hub/src/service.cpp, HubService::publish_desired, does the same).
#include <string>

#include "flotilla/bundles/director.hpp"
#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/v1/desired.pb.h"

namespace flotilla::agent::testing {

inline v1::DesiredHeader header_of(const v1::DesiredState& ds) {
  v1::DesiredHeader h;
  h.set_device_id(ds.device_id());
  h.set_generation(ds.generation());
  h.set_campaign_id(ds.campaign_id());
  h.set_issued_unix_ms(ds.issued_unix_ms());
  h.set_rollback(ds.rollback());
  const auto digest = crypto::sha256(ds.bundle().manifest());
  h.set_manifest_sha256(std::string(digest.begin(), digest.end()));
  h.set_artifact_base_url(ds.artifact_base_url());
  return h;
}

// Signs ds's own fields into its header.
inline void sign_header(v1::DesiredState& ds, const bundles::KeyPair& director) {
  *ds.mutable_header() = bundles::sign_desired_header(header_of(ds), director);
}

}  // namespace flotilla::agent::testing
