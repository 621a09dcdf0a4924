// bench/control_snapshot: what a snapshot of the control log costs
// (docs/adr/0016, "Snapshots and trimming"). Fills a real hub store with N
// enrolled devices (identity key, labels, host facts, one device certificate
// each, as enrollment leaves them), makes it follow a control log on a
// coordinator (a real etcd member when an endpoint is given, else the
// embedded SQLite coordinator), then times:
//   - writing the snapshot (copy through a read connection, chunks, manifest);
//   - a hub with an empty store loading it (fetch, check, apply);
//   - the same hub, one write behind, loading the next snapshot;
// and prints the snapshot's size per device and the loading hub's peak RSS.
//
//   build/bin/control_snapshot [DIR] [DEVICES] [ETCD_URL]   (default /tmp, 100000, none)
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <string>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/sqlite.hpp"
#include "flotilla/hub/control_log.hpp"
#include "flotilla/hub/coord.hpp"
#include "flotilla/hub/store.hpp"

namespace hub = flotilla::hub;
namespace co = flotilla::hub::coord;
using Clock = std::chrono::steady_clock;

namespace {

[[noreturn]] void die(const std::string& what, const flotilla::Error& e) {
  std::fprintf(stderr, "control_snapshot: %s: %s\n", what.c_str(), e.message.c_str());
  std::exit(1);
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

long peak_rss_kib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

std::unique_ptr<hub::Store> fresh_store(const std::filesystem::path& path) {
  for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(path.string() + suffix);
  auto store = hub::Store::open(path.string());
  if (!store) die("open " + path.string(), store.error());
  return std::move(*store);
}

}  // namespace

int main(int argc, char** argv) {
  const std::filesystem::path dir = argc > 1 ? argv[1] : "/tmp";
  const int devices = argc > 2 ? std::atoi(argv[2]) : 100000;
  const std::string etcd = argc > 3 ? argv[3] : "";
  std::filesystem::create_directories(dir / "writer");
  std::filesystem::create_directories(dir / "reader");

  std::unique_ptr<co::Coordinator> coordinator;
  if (etcd.empty()) {
    std::filesystem::remove(dir / "coord.db");
    auto c = co::open_sqlite_coordinator({(dir / "coord.db").string()});
    if (!c) die("coordinator", c.error());
    coordinator = std::move(*c);
  } else {
    co::EtcdOptions o;
    o.endpoints = {etcd};
    auto c = co::open_etcd_coordinator(o);
    if (!c) die("coordinator", c.error());
    coordinator = std::move(*c);
  }

  // The writer's store: N devices as enrollment leaves them.
  auto writer = fresh_store(dir / "writer" / "hub.db");
  const auto t_fill = Clock::now();
  {
    flotilla::sql::Transaction tx(writer->db());
    for (int i = 0; i < devices; ++i) {
      hub::DeviceRecord d;
      d.id = "dev-" + flotilla::crypto::random_token(8);
      d.public_key_hex = flotilla::crypto::random_token(32);
      d.labels = {{"site", "store-" + std::to_string(i % 2000)}, {"region", "eu-" + std::to_string(i % 7)},
                  {"hw", i % 3 ? "rpi4" : "nuc"}};
      d.hostname = "edge-" + std::to_string(i);
      d.arch = "arm64";
      d.agent_version = "0.9.0";
      d.enrolled_ms = 1764900000000 + i;
      d.cell = i % 4;
      if (auto s = writer->upsert_enrolled_device(d); !s) die("insert device", s.error());
      hub::DeviceCertRecord c;
      c.serial = flotilla::crypto::random_token(16);
      c.device_id = d.id;
      c.not_before = 1764900000;
      c.not_after = 1764900000 + 90 * 86400;
      c.issued_ms = d.enrolled_ms;
      if (auto s = writer->insert_device_cert(c); !s) die("insert certificate", s.error());
    }
    if (auto s = tx.commit(); !s) die("commit", s.error());
  }
  std::printf("store: %d devices written in %.1f s, %.1f MB\n", devices, seconds_since(t_fill),
              static_cast<double>(std::filesystem::file_size(dir / "writer" / "hub.db")) / 1e6);

  hub::ControlLogOptions opts;
  opts.prefix = "/flotilla-bench/" + flotilla::crypto::random_token(4) + "/";
  opts.snapshot_every = 0;  // by hand below
  opts.keep_entries = 0;
  hub::StoreMutex writer_mu;
  auto log = hub::ControlLog::open(writer->db(), writer_mu, *coordinator, opts);
  if (!log) die("control log", log.error());
  // One control write, so the store follows the log at entry 1.
  hub::TokenRecord t;
  t.id = "tok-bench";
  t.name = "bench";
  t.role = "viewer";
  t.project = "default";
  if (auto s = (*log)->write([&] { return writer->insert_token("api", t, flotilla::crypto::sha256_hex("x")); }); !s) {
    die("control write", s.error());
  }

  const auto t_snap = Clock::now();
  auto seq = (*log)->snapshot();
  if (!seq) die("snapshot", seq.error());
  const double snap_s = seconds_since(t_snap);
  auto m = (*log)->last_snapshot();
  if (!m || !*m) die("read the manifest", m ? flotilla::Error{} : m.error());
  std::printf("snapshot: seq=%lld, %.1f MB in %lld chunks, %.0f bytes per device, written in %.2f s (%.1f MB/s)\n",
              static_cast<long long>(*seq), static_cast<double>((*m)->bytes) / 1e6,
              static_cast<long long>((*m)->chunks), static_cast<double>((*m)->bytes) / devices, snap_s,
              static_cast<double>((*m)->bytes) / 1e6 / snap_s);

  // A hub from an empty store loads it.
  auto reader = fresh_store(dir / "reader" / "hub.db");
  hub::StoreMutex reader_mu;
  const long rss_before = peak_rss_kib();
  auto follower = hub::ControlLog::open(reader->db(), reader_mu, *coordinator, opts);
  if (!follower) die("control log", follower.error());
  const auto t_load = Clock::now();
  if (auto s = (*follower)->catch_up(); !s) die("load the snapshot", s.error());
  const double load_s = seconds_since(t_load);
  auto st = reader->db().prepare("SELECT COUNT(*) FROM devices");
  if (!st || !st->step()) die("count", flotilla::Error{});
  std::printf("load: %lld devices in %.2f s (%.1f MB/s), applied seq=%lld, loads=%llu, peak RSS %.0f MB (%.0f MB "
              "before)\n",
              static_cast<long long>(st->col_int(0)), load_s, static_cast<double>((*m)->bytes) / 1e6 / load_s,
              static_cast<long long>((*follower)->applied_seq()),
              static_cast<unsigned long long>((*follower)->counters().snapshots_loaded),
              static_cast<double>(peak_rss_kib()) / 1024, static_cast<double>(rss_before) / 1024);
  st->reset();

  // The same hub, behind by one write after the log was trimmed: it loads
  // the next snapshot over a store that already holds nearly all of it.
  t.id = "tok-bench-2";
  t.name = "bench-2";
  if (auto s = (*log)->write([&] { return writer->insert_token("api", t, flotilla::crypto::sha256_hex("y")); }); !s) {
    die("control write", s.error());
  }
  auto seq2 = (*log)->snapshot();
  if (!seq2) die("second snapshot", seq2.error());
  const auto t_reload = Clock::now();
  if (auto s = (*follower)->catch_up(); !s) die("load the second snapshot", s.error());
  const double reload_s = seconds_since(t_reload);
  std::printf("reload over a store one write behind: %.2f s, applied seq=%lld, loads=%llu, peak RSS %.0f MB\n",
              reload_s, static_cast<long long>((*follower)->applied_seq()),
              static_cast<unsigned long long>((*follower)->counters().snapshots_loaded),
              static_cast<double>(peak_rss_kib()) / 1024);
  return 0;
}
