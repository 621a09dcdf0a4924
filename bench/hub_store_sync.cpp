// bench/hub_store_sync: what SQLite's synchronous setting costs the hub.
// Commits report batches (512 device rows per transaction, as HubService::drain
// does) and single control writes (a token revocation) into a real hub store
// with synchronous=NORMAL (before issue 14), FULL for everything, and what the
// hub does now: FULL, relaxed to NORMAL for report batches only. Prints
// batches/s, reports/s and the median and p99 commit time of each.
//
//   build/bin/hub_store_sync [DIR] [DEVICES] [BATCHES]   (default /tmp, 10000, 400)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "flotilla/common/sqlite.hpp"
#include "flotilla/hub/store.hpp"

namespace hub = flotilla::hub;
using Clock = std::chrono::steady_clock;

namespace {

struct Figures {
  double per_s = 0, p50_ms = 0, p99_ms = 0;
};

Figures figures(std::vector<double> ms) {
  std::sort(ms.begin(), ms.end());
  double total = 0;
  for (double m : ms) total += m;
  return {ms.empty() ? 0 : 1000.0 * static_cast<double>(ms.size()) / total, ms[ms.size() / 2],
          ms[std::min(ms.size() - 1, ms.size() * 99 / 100)]};
}

void run(const std::string& mode, const std::filesystem::path& dir, int devices, int batches) {
  const auto path = dir / ("hub-store-sync-" + mode + ".db");
  for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(path.string() + suffix);
  auto store = hub::Store::open(path.string());
  if (!store) {
    std::fprintf(stderr, "open %s: %s\n", path.c_str(), store.error().message.c_str());
    std::exit(1);
  }
  auto& s = **store;
  {
    flotilla::sql::Transaction tx(s.db());
    for (int i = 0; i < devices; ++i) {
      hub::DeviceRecord d;
      d.id = "d-" + std::to_string(100000000 + i);
      d.public_key_hex = d.id;
      (void)s.upsert_enrolled_device(d);
    }
    (void)tx.commit();
  }
  const bool all_normal = mode == "normal";
  const bool relax_reports = mode == "hub";
  (void)s.relaxed_sync(all_normal);
  std::vector<double> batch_ms, control_ms;
  uint64_t seq = 0;
  for (int b = 0; b < batches; ++b) {
    const auto t0 = Clock::now();
    if (relax_reports) (void)s.relaxed_sync(true);
    {
      flotilla::sql::Transaction tx(s.db());
      for (int k = 0; k < 512; ++k) {
        hub::DeviceRecord d;
        d.id = "d-" + std::to_string(100000000 + (b * 512 + k) % devices);
        d.last_seq = ++seq;
        d.state = "applied";
        d.online = true;
        (void)s.save_device_state(d);
      }
      (void)tx.commit();
    }
    if (relax_reports) (void)s.relaxed_sync(false);
    batch_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    // A control write between batches, as the API makes them.
    if (b % 4 == 0) {
      hub::TokenRecord t;
      t.id = "tok-" + std::to_string(b);
      t.name = "bench";
      t.role = "viewer";
      const auto c0 = Clock::now();
      (void)s.insert_token("api", t, "hash-" + std::to_string(b));
      control_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - c0).count());
    }
  }
  const Figures r = figures(batch_ms), c = figures(control_ms);
  std::printf("%-7s report batches %7.1f/s (%9.0f reports/s)  batch p50 %6.2f ms p99 %6.2f ms  |  "
              "control write p50 %6.2f ms p99 %6.2f ms\n",
              mode.c_str(), r.per_s, r.per_s * 512, r.p50_ms, r.p99_ms, c.p50_ms, c.p99_ms);
  for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(path.string() + suffix);
}

}  // namespace

int main(int argc, char** argv) {
  const std::filesystem::path dir = argc > 1 ? argv[1] : "/tmp";
  const int devices = argc > 2 ? std::atoi(argv[2]) : 10000;
  const int batches = argc > 3 ? std::atoi(argv[3]) : 400;
  std::printf("hub store in %s, %d devices, %d batches of 512 reports\n", dir.c_str(), devices, batches);
  for (const char* mode : {"normal", "full", "hub"}) run(mode, dir, devices, batches);
  return 0;
}
