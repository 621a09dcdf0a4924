// [unit] replays the checked-in libFuzzer seed corpus (tests/fuzz/corpus/)
// through the same entry the fuzzer runs (bundles::fuzz::run_one), compiled
// with g++: a crash found by fuzzing and added to the corpus stays fixed.
#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "flotilla/bundles/fuzz.hpp"

namespace {
namespace stdfs = std::filesystem;
namespace v1 = flotilla::v1;

// Found from this file's own path (tests/unit/ -> tests/fuzz/corpus), so the
// test needs no build-system help; FLOTILLA_SOURCE_DIR overrides it.
stdfs::path corpus_dir() {
  if (const char* src = std::getenv("FLOTILLA_SOURCE_DIR"); src && *src) return stdfs::path(src) / "tests/fuzz/corpus";
#ifdef FLOTILLA_SOURCE_DIR
  // Compiled in by tests/CMakeLists.txt: __FILE__ may be relative to the
  // build directory (ccache, Ninja), which is not where ctest runs the test.
  return stdfs::path(FLOTILLA_SOURCE_DIR) / "tests/fuzz/corpus";
#else
  return stdfs::path(__FILE__).parent_path().parent_path() / "fuzz" / "corpus";
#endif
}

std::string read_all(const stdfs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

v1::Reason run(const std::string& bytes) {
  return flotilla::bundles::fuzz::run_one(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}
}  // namespace

TEST_CASE("fuzz corpus: every checked-in input runs through the fuzz entry", "[unit][bundles][fuzz]") {
  REQUIRE(stdfs::is_directory(corpus_dir()));
  size_t n = 0;
  for (const auto& e : stdfs::directory_iterator(corpus_dir())) {
    if (!e.is_regular_file()) continue;
    INFO(e.path().filename().string());
    const auto reason = run(read_all(e.path()));
    CHECK(v1::Reason_IsValid(reason));
    ++n;
  }
  CHECK(n >= 7);
}

TEST_CASE("fuzz corpus: the seeds reach every stage and give the expected verdicts", "[unit][bundles][fuzz]") {
  // The checked-in seeds are these generated inputs; if the format changes,
  // regenerate them (tests/fuzz/run.sh --write-seeds) so fuzzing starts deep.
  for (const auto& [name, bytes] : flotilla::bundles::fuzz::seed_inputs()) {
    INFO(name);
    const auto path = corpus_dir() / ("seed-" + name);
    REQUIRE(stdfs::exists(path));
    CHECK(read_all(path) == bytes);
  }
  auto seed = [](const std::string& name) { return read_all(corpus_dir() / ("seed-" + name)); };
  CHECK(run(seed("valid-rotation")) == v1::REASON_NONE);
  CHECK(run(seed("valid-root-v1")) == v1::REASON_NONE);
  CHECK(run(seed("revoked-and-expired-key")) == v1::REASON_KEY_REVOKED);
  CHECK(run(seed("rotation-bad-signature")) == v1::REASON_KEYRING_INVALID);
  CHECK(run(seed("unsigned-no-trust")) == v1::REASON_KEYRING_INVALID);  // no signing keyring yet
  CHECK(run(seed("envelope-only")) == v1::REASON_KEYRING_INVALID);
  CHECK(run(seed("garbage")) != v1::REASON_NONE);
}

// Writes the seeds; hidden, run by tests/fuzz/run.sh --write-seeds.
TEST_CASE("fuzz corpus: write seeds", "[.][write-seeds]") {
  for (const auto& [name, bytes] : flotilla::bundles::fuzz::seed_inputs()) {
    std::ofstream out(corpus_dir() / ("seed-" + name), std::ios::binary);
    out << bytes;
    REQUIRE(out.good());
  }
}
