#pragma once
// A flotilla-sim campaign against a test's hub, for integration tests that
// disturb it midway (a broker killed, a cell drained): start it, find its
// campaign once it is under way, read what it wrote.
#include <catch2/catch.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/process.hpp"
#include "tests/support/harness.hpp"

namespace flotilla::test {

// The simulator's release key for a seed (simulator/src/fleet.cpp,
// seeded_key): real agents trust it to apply the simulator's bundle.
inline bundles::KeyPair sim_release_key(uint64_t seed) {
  const auto h = crypto::sha256("flotilla-sim/release/" + std::to_string(seed) + "/0");
  auto k = bundles::key_from_seed(Bytes(h.begin(), h.end()));
  REQUIRE(k);
  return *k;
}

// Not `SimRun`: tests/integration/sim_support.hpp has that name for a
// finished run's results, and two classes of one name in one binary share
// (whichever) inline destructor.
class SimCampaign {
 public:
  // `flotilla-sim run --hub <hub> --label <label> --seed <seed> --no-progress
  // --out <dir>/sim` and `args`, with an admin token; its output in <dir>/sim.log.
  SimCampaign(Hub& hub, const stdfs::path& dir, const std::string& label, uint64_t seed,
         const std::vector<std::string>& args)
      : dir_(dir) {
    const auto token_file = dir / "sim-admin.token";
    REQUIRE(fs::write_file_atomic(token_file, hub.admin_token(), 0600));
    proc::SpawnOptions so;
    so.argv = {bin_dir() + "/flotilla-sim", "run", "--hub", hub.url(), "--token-file", token_file.string(),
               "--label", label, "--seed", std::to_string(seed), "--no-progress", "--out", (dir / "sim").string()};
    so.argv.insert(so.argv.end(), args.begin(), args.end());
    so.stdout_path = (dir / "sim.log").string();
    so.stderr_path = "stdout";
    auto c = proc::spawn(so);
    REQUIRE(c);
    child_ = std::move(*c);
  }
  SimCampaign(const SimCampaign&) = delete;
  SimCampaign& operator=(const SimCampaign&) = delete;
  ~SimCampaign() {
    if (child_.valid() && !child_.poll()) child_.terminate();
  }

  std::string log() const { return fs::read_file(dir_ / "sim.log", 1 << 20).value_or(""); }
  // Its last lines, for a failure's message.
  std::string log_tail(size_t bytes = 16 * 1024) const {
    const std::string text = log();
    return text.size() > bytes ? "..." + text.substr(text.size() - bytes) : text;
  }
  json report() const { return json::parse(fs::read_file(dir_ / "sim" / "report.json", 64u << 20).value_or("{}")); }
  std::optional<int> wait_for(std::chrono::milliseconds timeout) { return child_.wait_for(timeout); }

 private:
  stdfs::path dir_;
  proc::Child child_;
};

// The id of the simulator's campaign (named sim-<label>) once at least
// `applied` devices applied it; empty if that did not happen in time, and
// then `seen` (when given) says what the hub last answered about it.
inline std::string wait_sim_campaign(Hub& hub, const std::string& label, int applied,
                                     std::chrono::milliseconds timeout, std::string* seen = nullptr) {
  std::string id, last = "no answer from GET /v1/campaigns";
  (void)wait_until(
      [&] {
        auto [status, body] = hub.call("GET", "/v1/campaigns");
        if (status != 200) {
          last = "GET /v1/campaigns: " + std::to_string(status) + " " + body.dump();
          return false;
        }
        last = "no campaign named sim-" + label + " yet";
        for (const auto& c : body["items"]) {
          if (c["name"] != "sim-" + label) continue;
          last = c.dump();
          if (c["counts"]["applied"].get<int>() >= applied) {
            id = c["id"].get<std::string>();
            return true;
          }
        }
        return false;
      },
      timeout);
  if (seen) *seen = last;
  return id;
}

}  // namespace flotilla::test
