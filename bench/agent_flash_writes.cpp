// bench/agent_flash_writes: what one apply costs the device's flash through
// the agent's own store (var/lib/flotilla/agent.db, SQLite WAL,
// synchronous=FULL). Runs the real agent core with the real SqliteStateStore
// over an in-memory file tree (so installed files do not count: only the
// journal and the state the agent keeps), applying bundles whose inline files
// total `MiB` mebibytes, and prints per apply: bytes handed to write(2)
// (/proc/self/io wchar), fsync/fdatasync calls, and the same for an idle
// inventory check and a drift check (nothing to write).
//
//   build/bin/agent_flash_writes [DIR] [MiB] [APPLIES]   (default /tmp, 2, 10)
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "edge-agent/testing/fakes.hpp"
#include "flotilla/agent/agent.hpp"
#include "flotilla/agent/disk.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/v1/desired.pb.h"

namespace {
std::atomic<uint64_t> g_syncs{0};
}

// Counted, then passed on: SQLite's unix VFS calls these through libc, and a
// definition in the executable takes their place for every shared library.
extern "C" int fsync(int fd) {
  ++g_syncs;
  return static_cast<int>(::syscall(SYS_fsync, fd));
}
extern "C" int fdatasync(int fd) {
  ++g_syncs;
  return static_cast<int>(::syscall(SYS_fdatasync, fd));
}

namespace {

namespace agent = flotilla::agent;
namespace bundles = flotilla::bundles;
namespace v1 = flotilla::v1;

uint64_t wchar() {
  std::ifstream io("/proc/self/io");
  std::string key;
  uint64_t value = 0;
  while (io >> key >> value) {
    if (key == "wchar:") return value;
  }
  return 0;
}

struct Sample {
  uint64_t bytes = 0, syncs = 0;
};

template <typename F>
Sample measure(F&& f) {
  const uint64_t w0 = wchar(), s0 = g_syncs.load();
  f();
  return {wchar() - w0, g_syncs.load() - s0};
}

}  // namespace

int main(int argc, char** argv) {
  const std::filesystem::path dir = argc > 1 ? argv[1] : "/tmp";
  const size_t mib = argc > 2 ? std::strtoul(argv[2], nullptr, 10) : 2;
  const int applies = argc > 3 ? std::atoi(argv[3]) : 10;
  flotilla::crypto::init();
  const auto db = dir / ("agent-flash-" + std::to_string(::getpid()) + ".db");
  auto store = agent::SqliteStateStore::open(db.string());
  if (!store) {
    std::fprintf(stderr, "open %s: %s\n", db.c_str(), store.error().message.c_str());
    return 1;
  }
  flotilla::FakeClock clock;
  agent::testing::FakeK3sRuntime runtime;
  agent::testing::MemFileTree files;
  const auto key = bundles::generate_key();
  agent::CoreConfig cfg;
  cfg.device_id = "d-bench";
  cfg.arch = "amd64";
  cfg.keyring.add(key.pub);
  cfg.health_poll = std::chrono::milliseconds(0);
  cfg.mem_free_bytes = [] { return uint64_t{1} << 30; };
  int reports = 0;
  agent::Agent a(cfg, runtime, files, **store, clock, [&](v1::Report&&) { ++reports; });
  if (auto s = a.start(); !s) {
    std::fprintf(stderr, "start: %s\n", s.error().message.c_str());
    return 1;
  }
  Sample total;
  for (int i = 1; i <= applies; ++i) {
    v1::BundleManifest m;
    m.set_format_version(1);
    m.set_name("bench");
    m.set_channel("stable");
    m.set_version(static_cast<uint64_t>(i));
    m.set_created_unix(clock.now_unix());
    m.set_expires_unix(clock.now_unix() + 86400);
    // Random (incompressible) content, as a real manifest of that size would be to the flash.
    for (size_t f = 0; f < mib; ++f) {
      auto* bf = m.add_files();
      bf->set_kind(v1::FILE_KIND_MANIFEST);
      bf->set_name("app-" + std::to_string(f) + ".yaml");
      std::string content = flotilla::crypto::random_token(512 * 1024);  // 1 MiB of hex
      bf->set_content(content);
      const auto h = flotilla::crypto::sha256(content);
      bf->set_sha256(std::string(h.begin(), h.end()));
    }
    auto env = bundles::wrap(m);
    if (auto s = bundles::sign(env, key); !s) return 1;
    v1::DesiredState ds;
    ds.set_device_id(cfg.device_id);
    ds.set_generation(static_cast<uint64_t>(i));
    *ds.mutable_bundle() = env;
    const std::string payload = ds.SerializeAsString();
    const Sample s = measure([&] { a.handle_desired(payload); });
    if (a.applied().version != static_cast<uint64_t>(i)) {
      std::fprintf(stderr, "apply %d did not commit\n", i);
      return 1;
    }
    std::printf("apply %2d: %9llu bytes written, %3llu fsyncs\n", i, static_cast<unsigned long long>(s.bytes),
                static_cast<unsigned long long>(s.syncs));
    total.bytes += s.bytes;
    total.syncs += s.syncs;
  }
  const Sample idle = measure([&] { (void)a.check_inventory(); });
  const Sample drift = measure([&] { (void)a.check_drift(); });
  std::printf("desired state %zu MiB of inline files; mean per apply: %.0f bytes (%.2f x the desired state), "
              "%.1f fsyncs\n",
              mib, static_cast<double>(total.bytes) / applies,
              static_cast<double>(total.bytes) / applies / static_cast<double>(mib << 20),
              static_cast<double>(total.syncs) / applies);
  std::printf("inventory check: %llu bytes, %llu fsyncs; drift check: %llu bytes, %llu fsyncs\n",
              static_cast<unsigned long long>(idle.bytes), static_cast<unsigned long long>(idle.syncs),
              static_cast<unsigned long long>(drift.bytes), static_cast<unsigned long long>(drift.syncs));
  for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(db.string() + suffix);
  return reports > 0 ? 0 : 1;
}
