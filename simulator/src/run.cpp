// Entry points of the library: a whole run (with an own hub when none is
// given), process usage sampling and the network-free footprint measurement.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "device.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/process.hpp"
#include "sim_internal.hpp"

namespace flotilla::sim {

using nlohmann::json;

std::optional<ProcUsage> proc_usage(int pid) {
  const std::string base = "/proc/" + std::to_string(pid);
  auto stat = fs::read_file(base + "/stat", 4096);
  auto statm = fs::read_file(base + "/statm", 4096);
  if (!stat || !statm) return std::nullopt;
  ProcUsage u;
  // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
  const auto close = stat->rfind(')');
  if (close == std::string::npos) return std::nullopt;
  std::istringstream in(stat->substr(close + 2));
  std::string field;
  unsigned long long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && in >> field; ++i) {
    if (i == 14) utime = std::stoull(field);
    if (i == 15) stime = std::stoull(field);
  }
  const double tick = static_cast<double>(::sysconf(_SC_CLK_TCK));
  u.cpu_s = static_cast<double>(utime + stime) / tick;
  unsigned long long size = 0, resident = 0, shared = 0;
  std::istringstream m(*statm);
  m >> size >> resident >> shared;
  const auto page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  u.rss_bytes = resident * page;
  u.rss_file_bytes = shared * page;
  return u;
}

namespace {

struct OwnHub {
  proc::Child child;
  std::string url;
  std::string token;
  ~OwnHub() {
    if (child.valid()) child.terminate(std::chrono::seconds(10));
  }
};

Status start_own_hub(const SimOptions& opts, OwnHub& hub) {
  const std::filesystem::path data = std::filesystem::path(opts.work_dir) / "hub";
  std::error_code ec;
  std::filesystem::create_directories(data, ec);
  std::filesystem::remove(data / "hub.url", ec);
  proc::SpawnOptions so;
  so.argv = {opts.hub_bin, "--data-dir", data.string(), "--listen", "127.0.0.1:0", "--config", "",
             "--log-level", "warn",
             // A direct enrollment holds a REST thread until its commit is
             // durable; enrollments waiting together share a commit.
             "--http-threads", std::to_string(std::clamp<uint32_t>(opts.enroll_threads, 2, 64)),
             // The hub's own defaults guard against abuse; a load run from one
             // address measures the hub instead, so it lifts them.
             "--enroll-rate", "0", "--enroll-rate-per-token", "0", "--http-max-connections-per-peer", "0"};
  so.stdout_path = (std::filesystem::path(opts.work_dir) / "hub.log").string();
  so.stderr_path = "stdout";
  so.die_with_parent = true;
  auto c = proc::spawn(so);
  if (!c) return c.error().with_context("start " + opts.hub_bin);
  hub.child = std::move(*c);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    if (hub.child.poll()) break;
    if (auto u = fs::read_file(data / "hub.url", 256)) {
      hub.url = u->substr(0, u->find('\n'));
      http::Request r;
      r.url = hub.url + "/readyz";
      r.timeout = std::chrono::seconds(2);
      if (auto resp = http::send(r); resp && resp->status == 200) {
        auto t = fs::read_file(data / "admin.token", 4096);
        if (!t) return make_error(Errc::internal, "the hub wrote no admin.token");
        hub.token = t->substr(0, t->find('\n'));
        return {};
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  auto log = fs::read_file(so.stdout_path, 1 << 20).value_or("");
  if (log.size() > 800) log = log.substr(log.size() - 800);
  return make_error(Errc::unavailable, "the hub did not become ready; its log ends:\n" + log);
}

}  // namespace

Result<json> run(const SimOptions& in) {
  SimOptions opts = in;
  if (opts.work_dir.empty()) return make_error(Errc::invalid_argument, "a work directory is needed");
  std::error_code ec;
  std::filesystem::create_directories(opts.work_dir, ec);
  OwnHub own;
  Rest rest{opts.hub_url, opts.token};
  if (opts.hub_url.empty()) {
    if (auto s = start_own_hub(opts, own); !s) return s.error();
    rest = Rest{own.url, own.token};
    opts.hub_pid = own.child.pid();
  }
  auto report = run_fleet(opts, rest);
  if (!report) return report;
  (*report)["config"]["self_contained"] = opts.hub_url.empty();
  const std::string json_path = opts.report_json.empty() ? opts.work_dir + "/report.json" : opts.report_json;
  const std::string html_path = opts.report_html.empty() ? opts.work_dir + "/report.html" : opts.report_html;
  if (auto s = fs::write_file_atomic(json_path, report->dump(1) + "\n", 0644); !s) return s.error();
  // Serve only has no campaign timeline to draw.
  if (!opts.serve_only) {
    if (auto s = fs::write_file_atomic(html_path, render_html(*report), 0644); !s) return s.error();
  }
  return report;
}

json measure_footprint(uint32_t n, uint64_t seed) {
  // A signed desired state, like the hub's, per device (device id and
  // generation differ); the bundle bytes are the same for all.
  auto release = bundles::key_from_seed(Bytes(32, static_cast<uint8_t>(seed)));
  v1::BundleManifest m;
  m.set_format_version(1);
  m.set_name("footprint");
  m.set_channel("sim");
  m.set_version(1);
  m.set_created_unix(SystemClock::instance().now_unix());
  m.set_expires_unix(m.created_unix() + 3600);
  add_bundle_file(m, v1::FILE_KIND_K3S_CONFIG, "50-sim.yaml", "node-label:\n  - \"flotilla-sim=footprint\"\n");
  v1::SignedBundle env = bundles::wrap(m);
  (void)bundles::sign(env, *release);

  CoreEnv core;
  core.base.arch = "amd64";
  core.base.keyring.add(release->pub);
  core.base.min_free_bytes = 0;
  auto rss = [] { return proc_usage(::getpid()).value_or(ProcUsage{}).rss_bytes; };
  const uint64_t before = rss();
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<VDevice> devices(n);
  uint64_t reports = 0, applied = 0;
  for (uint32_t i = 0; i < n; ++i) {
    auto& d = devices[i];
    d.index = i;
    d.id = "d-" + crypto::sha256_hex(std::to_string(seed) + "/" + std::to_string(i)).substr(0, 20);
    v1::DesiredState ds;
    ds.set_device_id(d.id);
    ds.set_generation(1);
    ds.set_campaign_id("c-footprint");
    *ds.mutable_bundle() = env;
    const std::string payload = ds.SerializeAsString();
    with_agent(d, core, [&](v1::Report&& r) {
      ++reports;
      applied += r.state() == v1::AGENT_STATE_APPLIED ? 1 : 0;
    }, [&](agent::Agent& a) { a.handle_desired(payload); });
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const uint64_t after = rss();
  uint64_t state_bytes = 0;
  for (const auto& d : devices) state_bytes += d.store.state.capacity() + d.store.files.capacity() * sizeof(FileEntry);
  return json{{"devices", n},
              {"applied", applied},
              {"reports", reports},
              {"seconds", secs},
              {"applies_per_s", n / std::max(secs, 1e-9)},
              {"rss_delta_bytes", after > before ? after - before : 0},
              {"bytes_per_device", n ? static_cast<double>(after > before ? after - before : 0) / n : 0.0},
              {"state_bytes_per_device", n ? static_cast<double>(state_bytes) / n : 0.0},
              {"sizeof_device", sizeof(VDevice)},
              {"interned_strings", interned_count()}};
}

}  // namespace flotilla::sim
