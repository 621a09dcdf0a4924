// bench/enroll_store: what enrollment costs the hub's store as the fleet
// grows, with the device rows in hub.db or in each cell's own file
// (--cell-files, docs/adr/0018). It writes devices in batches as
// HubService::enroll_batch does (one transaction per batch, each device a
// directory write with its outbox entry), then follows the directory's
// outbox as follow_own_write does (with files: each device's copy in its
// cell's file). Every 100,000 devices it prints the rate of the last
// 100,000 and the time split between the two steps. The gateway batches of
// `flotilla-sim` put a batch in one cell; so does this, in turn.
//
//   build/bin/enroll_store [DIR] [DEVICES] [BATCH] [CELLS] [FILES] [MMAP_MIB]
//   (default /tmp/enroll-store, 1000000, 1000, 4, 1, 0; FILES 0 = hub.db only;
//   bench/cells.sh gives the hub db-mmap-mib 2048 above 100k devices).
//   ENROLL_STORE_PRAGMA="name = value" runs that PRAGMA on every writer
//   connection first, to try a setting before it goes into Store::open.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/sqlite.hpp"
#include "flotilla/hub/store.hpp"

namespace hub = flotilla::hub;
using Steady = std::chrono::steady_clock;

namespace {

[[noreturn]] void die(const std::string& what, const flotilla::Error& e) {
  std::fprintf(stderr, "enroll_store: %s: %s\n", what.c_str(), e.message.c_str());
  std::exit(1);
}

double s_since(Steady::time_point t0) { return std::chrono::duration<double>(Steady::now() - t0).count(); }

}  // namespace

int main(int argc, char** argv) {
  const std::filesystem::path dir = argc > 1 ? argv[1] : "/tmp/enroll-store";
  const int devices = argc > 2 ? std::atoi(argv[2]) : 1000000;
  const int batch = argc > 3 ? std::atoi(argv[3]) : 1000;
  const int cells = argc > 4 ? std::atoi(argv[4]) : 4;
  const bool files = argc > 5 ? std::atoi(argv[5]) != 0 : true;
  const int mmap_mib = argc > 6 ? std::atoi(argv[6]) : 0;
  if (devices < 1 || batch < 1 || cells < 1 || cells > 64 || mmap_mib < 0) {
    std::fprintf(stderr, "enroll_store: DEVICES and BATCH at least 1, CELLS 1..64\n");
    return 2;
  }
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const hub::StoreTuning tuning{64, mmap_mib};  // the hub's db-cache-mib default, 64
  auto store = hub::Store::open((dir / "hub.db").string(), tuning);
  if (!store) die("open hub.db", store.error());
  std::vector<std::unique_ptr<hub::Store>> cell_files;
  for (int c = 0; files && c < cells; ++c) {
    const auto d = dir / "cells" / std::to_string(c);
    std::filesystem::create_directories(d);
    auto f = hub::Store::open_cell((d / "devices.db").string(), c, tuning);
    if (!f) die("open cell " + std::to_string(c) + "'s file", f.error());
    cell_files.push_back(std::move(*f));
  }
  if (files) {
    // hub.db as the hub keeps it with files: the directory only.
    std::vector<hub::DeviceStore*> parts;
    for (auto& f : cell_files) parts.push_back(f.get());
    if (auto s = hub::move_rows_to_cell_files(**store, parts); !s) die("hub.db as the directory", s.error());
  }
  if (const char* p = std::getenv("ENROLL_STORE_PRAGMA")) {
    const std::string pragma = std::string("PRAGMA ") + p;
    if (auto r = (*store)->db().exec(pragma); !r) die(pragma, r.error());
    for (auto& f : cell_files) {
      if (auto r = f->db().exec(pragma); !r) die(pragma, r.error());
    }
  }
  auto store_of = [&](int c) -> hub::DeviceStore& {
    if (files) return *cell_files[static_cast<size_t>(c)];
    return **store;
  };
  auto none = [](const hub::DirectoryChange&) -> flotilla::Status { return {}; };

  std::printf("enroll_store: %d devices in batches of %d over %d cells, rows in %s\n", devices, batch, cells,
              files ? "each cell's file" : "hub.db");
  const auto t0 = Steady::now();
  auto t_step = t0;
  double write_s = 0, follow_s = 0;
  int next_report = 100000;
  for (int first = 0, n = 0; first < devices; first += batch, ++n) {
    const int count = std::min(batch, devices - first);
    const auto tw = Steady::now();
    {
      flotilla::sql::Transaction tx((*store)->db());
      for (int i = first; i < first + count; ++i) {
        hub::DeviceRecord d;
        d.id = "d-" + flotilla::crypto::random_token(10);
        d.project = "default";
        d.public_key_hex = flotilla::crypto::random_token(32);
        d.labels = {{"site", "store-" + std::to_string(i % 2000)}, {"hw", i % 3 ? "rpi4" : "nuc"}};
        d.hostname = "sim-" + std::to_string(i);
        d.arch = "arm64";
        d.gateway = "gw-" + std::to_string(first / batch);
        d.enrolled_ms = 1764900000000 + i;
        d.cell = n % cells;
        if (auto s = (*store)->local_directory_write([&] { return (*store)->upsert_enrolled_device(d); }); !s) {
          die("enroll", s.error());
        }
      }
      if (auto s = tx.commit(); !s) die("commit", s.error());
    }
    const auto tf = Steady::now();
    write_s += s_since(tw);
    auto followed = hub::follow_directory_outbox(**store, store_of, none, files);
    if (!followed) die("follow the directory", followed.error());
    follow_s += s_since(tf);
    if (first + count >= next_report || first + count == devices) {
      const double step = s_since(t_step);
      std::printf("%8d devices: %6.0f devices/s over the last step, %6.1f s in all (directory writes %.1f s, "
                  "follow %.1f s)\n",
                  first + count, (first + count - (next_report - 100000)) / step, s_since(t0), write_s, follow_s);
      std::fflush(stdout);
      t_step = Steady::now();
      next_report += 100000;
    }
  }
  std::printf("enroll_store: %d devices in %.1f s (%.0f devices/s): directory writes %.1f s, follow %.1f s\n", devices,
              s_since(t0), devices / s_since(t0), write_s, follow_s);
  return 0;
}
