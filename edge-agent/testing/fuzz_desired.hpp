#pragma once
// The fuzz entry over the agent's desired-state path: decoding, the director
// header checks (decide_desired) and Agent::handle_desired over in-memory
// fakes, with invariants checked after every input. Built into the libFuzzer
// target (tests/fuzz/, clang) and the unit tests' corpus replay (g++), so both
// run exactly the same code. Not part of the agent itself.
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "flotilla/v1/report.pb.h"

namespace flotilla::agent::fuzz {

// Input layout: one byte of flags (bit 0: the agent pins the director key;
// bit 1: the device has applied a bundle, v5 at generation 10), then the raw
// desired-state payload. Returns the reason of the last report about it
// (REASON_NONE when applied or nothing was reported). Traps when an
// invariant breaks: a refused or failed input changed the node's files, the
// applied bundle or the floors; an unsigned generation became a floor.
v1::Reason run_one(const uint8_t* data, size_t size);

// Deterministic seeds (name, bytes) reaching every stage: applied, replayed,
// unsigned, bad signature, mismatch, rollback (signed and not), garbage.
std::vector<std::pair<std::string, std::string>> seed_inputs();

}  // namespace flotilla::agent::fuzz
