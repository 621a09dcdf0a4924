// libFuzzer target: the agent's desired-state path (decode, director header
// checks, trust update, bundle verification, apply over in-memory fakes). The
// logic is agent::fuzz::run_one (edge-agent/testing/fuzz_desired.cpp), which
// the unit tests also run over tests/fuzz/corpus/agent_desired/ (with g++).
#include <google/protobuf/stubs/logging.h>

#include <cstddef>
#include <cstdint>

#include "edge-agent/testing/fuzz_desired.hpp"
#include "flotilla/common/log.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  // The agent logs every refusal; at thousands of inputs a second that is noise.
  flotilla::log::setup("off");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)flotilla::agent::fuzz::run_one(data, size);
  return 0;
}
