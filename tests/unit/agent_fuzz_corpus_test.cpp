// [unit] replays the checked-in seed corpus of the agent's desired-state fuzz
// target (tests/fuzz/corpus/agent_desired/) through the same entry the fuzzer
// runs (agent::fuzz::run_one), compiled with g++: a crash found by fuzzing
// and added to the corpus stays fixed. run_one traps on a broken invariant.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "edge-agent/testing/fuzz_desired.hpp"

namespace {
namespace stdfs = std::filesystem;
namespace v1 = flotilla::v1;

stdfs::path corpus_dir() { return stdfs::path(FLOTILLA_SOURCE_DIR) / "tests/fuzz/corpus/agent_desired"; }

std::string read_all(const stdfs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

v1::Reason run(const std::string& bytes) {
  return flotilla::agent::fuzz::run_one(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}
}  // namespace

TEST_CASE("agent fuzz corpus: every checked-in input runs through the fuzz entry", "[unit][agent][fuzz]") {
  REQUIRE(stdfs::is_directory(corpus_dir()));
  size_t n = 0;
  for (const auto& e : stdfs::directory_iterator(corpus_dir())) {
    if (!e.is_regular_file()) continue;
    INFO(e.path().filename().string());
    CHECK(v1::Reason_IsValid(run(read_all(e.path()))));
    ++n;
  }
  CHECK(n >= 12);
}

TEST_CASE("agent fuzz corpus: the seeds reach every check and give the expected verdicts", "[unit][agent][fuzz]") {
  for (const auto& [name, bytes] : flotilla::agent::fuzz::seed_inputs()) {
    INFO(name);
    const auto path = corpus_dir() / ("seed-" + name);
    REQUIRE(stdfs::exists(path));
    CHECK(read_all(path) == bytes);  // regenerate with tests/fuzz/run.sh --write-seeds if the format changed
  }
  auto seed = [](const std::string& name) { return run(read_all(corpus_dir() / ("seed-" + name))); };
  CHECK(seed("signed-next") == v1::REASON_NONE);
  CHECK(seed("signed-fresh-device") == v1::REASON_NONE);
  CHECK(seed("signed-rollback-to-previous") == v1::REASON_NONE);
  CHECK(seed("legacy-next") == v1::REASON_NONE);
  CHECK(seed("signed-replay") == v1::REASON_DESIRED_REPLAY);
  CHECK(seed("unsigned-on-pinned") == v1::REASON_DESIRED_UNSIGNED);
  CHECK(seed("signed-by-stranger") == v1::REASON_DESIRED_BAD_SIGNATURE);
  CHECK(seed("generation-outside-header") == v1::REASON_DESIRED_MISMATCH);
  CHECK(seed("bundle-swapped") == v1::REASON_DESIRED_MISMATCH);
  CHECK(seed("legacy-rollback") == v1::REASON_DESIRED_UNSIGNED);
  CHECK(seed("channel-hop") == v1::REASON_CHANNEL_SWITCH);
  CHECK(seed("garbage") == v1::REASON_MALFORMED_DESIRED);
}

// Writes the seeds; hidden, run by tests/fuzz/run.sh --write-seeds.
TEST_CASE("agent fuzz corpus: write seeds", "[.][write-seeds]") {
  stdfs::create_directories(corpus_dir());
  for (const auto& [name, bytes] : flotilla::agent::fuzz::seed_inputs()) {
    std::ofstream out(corpus_dir() / ("seed-" + name), std::ios::binary);
    out << bytes;
    REQUIRE(out.good());
  }
}
