// bench/drain_arrivals: what a batch of devices arriving from a draining
// cell costs the hub process that receives them (docs/adr/0019): the rows
// their running campaigns give them. Fills a real hub store with N devices
// over 4 cells, then times HubService::members_by_id for batches of
// arrivals, for a campaign with a percentage canary (rows found by id
// alone) and one with a count-based canary (its cutoff takes one scan of the
// fleet, once per campaign; later batches reuse it). The scan's time is what
// every batch cost per campaign and target cell before membership by id.
//
//   build/bin/drain_arrivals [DIR] [DEVICES] [BATCH]   (default /tmp, 200000, 500)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "flotilla/common/clock.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/sqlite.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/hub/store.hpp"

namespace hub = flotilla::hub;
using Steady = std::chrono::steady_clock;

namespace {

[[noreturn]] void die(const std::string& what, const flotilla::Error& e) {
  std::fprintf(stderr, "drain_arrivals: %s: %s\n", what.c_str(), e.message.c_str());
  std::exit(1);
}

double ms_since(Steady::time_point t0) { return std::chrono::duration<double, std::milli>(Steady::now() - t0).count(); }

hub::CampaignRecord campaign(const std::string& id, const std::string& strategy) {
  hub::CampaignRecord c;
  c.id = id;
  c.name = id;
  c.bundle_id = "b-bench";
  c.selector = "hw=rpi4";
  c.project = "default";
  c.strategy = strategy;
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  const std::filesystem::path dir = argc > 1 ? argv[1] : "/tmp";
  const int devices = argc > 2 ? std::atoi(argv[2]) : 200000;
  const int batch = argc > 3 ? std::atoi(argv[3]) : 500;
  if (devices < batch * 4 || batch < 1) {
    std::fprintf(stderr, "drain_arrivals: DEVICES must be at least 4 x BATCH, and BATCH at least 1\n");
    return 2;
  }
  std::filesystem::create_directories(dir);
  const auto path = dir / "drain-arrivals.db";
  for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(path.string() + suffix);
  auto store = hub::Store::open(path.string());
  if (!store) die("open " + path.string(), store.error());

  std::vector<std::string> ids;
  const auto t_fill = Steady::now();
  {
    flotilla::sql::Transaction tx((*store)->db());
    for (int i = 0; i < devices; ++i) {
      hub::DeviceRecord d;
      d.id = "dev-" + flotilla::crypto::random_token(8);
      d.public_key_hex = flotilla::crypto::random_token(32);
      d.labels = {{"site", "store-" + std::to_string(i % 2000)}, {"hw", i % 3 ? "rpi4" : "nuc"}};
      d.enrolled_ms = 1764900000000 + i;
      d.cell = i % 4;
      if (auto s = (*store)->upsert_enrolled_device(d); !s) die("insert device", s.error());
      ids.push_back(d.id);
    }
    if (auto s = tx.commit(); !s) die("commit", s.error());
  }
  std::printf("store: %d devices over 4 cells written in %.1f s\n", devices, ms_since(t_fill) / 1000);

  flotilla::SystemClock clock;
  hub::ServiceConfig cfg;
  cfg.broker_url = "tcp://127.0.0.1:1";
  cfg.public_url = "http://hub.bench";
  cfg.engine_thread = false;
  hub::HubService svc(**store, clock, cfg);

  // The arrivals: the devices of cell 0, a batch at a time.
  std::vector<std::string> cell0;
  for (size_t i = 0; i < ids.size(); i += 4) cell0.push_back(ids[i]);
  auto time_batches = [&](const hub::CampaignRecord& c, const char* what) {
    const int rounds = 4;
    double first = 0, rest = 0;
    size_t members = 0;
    for (int r = 0; r < rounds; ++r) {
      std::vector<std::string> arrived(cell0.begin() + r * batch, cell0.begin() + (r + 1) * batch);
      const auto t0 = Steady::now();
      auto m = svc.members_by_id(c, arrived);
      const double ms = ms_since(t0);
      if (!m) die("members_by_id", m.error());
      members += m->size();
      (r == 0 ? first : rest) += ms;
    }
    std::printf("%s: batch of %d arrivals: first %.1f ms, then %.1f ms per batch (%zu of %d matched)\n", what, batch,
                first, rest / (rounds - 1), members, rounds * batch);
  };
  time_batches(campaign("c-percent", R"({"canary": "5%", "waves": [25, 100]})"), "percentage canary");
  time_batches(campaign("c-count", R"({"canary": 50, "waves": [25, 100]})"), "count canary (first batch scans)");

  // A full scan as membership by cell made it: every device's target
  // columns, the selector and the rank (once per campaign and target cell
  // per batch before).
  const auto t_scan = Steady::now();
  size_t matched = 0;
  auto scanned = (*store)->each_device_target_cell(
      [&](const std::string& id, const std::string&, bool, const hub::Labels& labels, int) {
        auto hw = labels.find("hw");
        if (hw == labels.end() || hw->second != "rpi4") return;
        matched += hub::campaign_rank("c-scan", id) < 2 ? 1 : 0;
      });
  if (!scanned) die("scan", scanned.error());
  std::printf("one scan of the fleet (selector and rank of every device): %.1f ms, %zu matched\n", ms_since(t_scan),
              matched);
  svc.stop();
  return 0;
}
