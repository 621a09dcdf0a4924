// libFuzzer target: trust-chain parsing and update, envelope parsing and
// verification, overlay resolution. The logic is bundles::fuzz::run_one, which
// the unit tests also run over tests/fuzz/corpus/ (compiled with g++).
#include <google/protobuf/stubs/logging.h>

#include <cstddef>
#include <cstdint>

#include "flotilla/bundles/fuzz.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Protobuf logs every invalid-UTF-8 string it refuses; at thousands of
  // inputs a second that drowns the fuzzer's own output and slows it down.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)flotilla::bundles::fuzz::run_one(data, size);
  return 0;
}
