#pragma once
// The fuzz entry over envelope and keyring parsing and verification. It lives
// in the library so the libFuzzer target (tests/fuzz/, clang) and the corpus
// replay unit test (g++) run exactly the same code.
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "flotilla/v1/report.pb.h"

namespace flotilla::bundles::fuzz {

// Input layout: a 4-byte little-endian length L, L bytes of a serialized
// v1::Trust, then the rest: a serialized v1::SignedBundle. Shorter inputs are
// all envelope. The trust store starts pinned to a fixed root (deterministic
// test keys) at a fixed time, follows the Trust, then verifies the bundle;
// an accepted bundle is also resolved against fixed labels and diffed.
// Returns the verdict (REASON_NONE = accepted).
v1::Reason run_one(const uint8_t* data, size_t size);

// Deterministic seed inputs (name, bytes), reaching every stage: valid chain
// and bundle, rotation, revocation, expired key, unsigned, garbage.
std::vector<std::pair<std::string, std::string>> seed_inputs();

}  // namespace flotilla::bundles::fuzz
