#pragma once
// The director's signature on the per-device part of a desired state
// (proto/flotilla/v1/desired.proto, DesiredHeader; docs/adr/0008-director-
// signed-desired-state.md). The hub signs, the agent verifies: both need the
// exact same message, so it lives here beside the bundle signatures.
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/v1/desired.pb.h"
#include "flotilla/v1/report.pb.h"

namespace flotilla::bundles {

// A serialized header is small (ids, a hash, a URL); anything bigger is not one.
inline constexpr size_t kMaxDesiredHeaderBytes = 16 * 1024;
// Generations, like bundle versions, are stored as SQLite integers (int64)
// by the agent and the hub: a larger one would not survive a restart.
inline constexpr uint64_t kMaxStoredInteger = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());

// What the director key signs: a fixed context string, then the header bytes.
// The context keeps a director signature from meaning anything else.
std::string desired_header_message(std::string_view header_bytes);

// Serializes the header deterministically and signs it.
v1::SignedDesiredHeader sign_desired_header(const v1::DesiredHeader& header, const KeyPair& director);

struct HeaderVerdict {
  v1::Reason reason = v1::REASON_NONE;
  std::string message;
  v1::DesiredHeader header;  // filled when accepted
  bool ok() const { return reason == v1::REASON_NONE; }
};

// Signature first, then parsing: REASON_DESIRED_UNSIGNED (no signature),
// REASON_DESIRED_BAD_SIGNATURE (another key, or one that does not verify),
// REASON_MALFORMED_DESIRED (too large, or the signed bytes do not parse).
HeaderVerdict verify_desired_header(const v1::SignedDesiredHeader& signed_header, const PublicKey& director);

}  // namespace flotilla::bundles
