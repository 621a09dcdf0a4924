// flotilla-sim: thin main; the logic lives in flotilla_sim.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <optional>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/options.hpp"
#include "flotilla/common/process.hpp"
#include "flotilla/common/version.hpp"
#include "flotilla/sim/fleet.hpp"
#include "flotilla/sim/k3d.hpp"

using namespace flotilla;

namespace {

// Serve only: SIGTERM or SIGINT ends serving (lock-free, so signal-safe).
std::atomic<bool> g_stop{false};
static_assert(std::atomic<bool>::is_always_lock_free);
void on_stop_signal(int) { g_stop.store(true); }

void usage() {
  std::cout << "flotilla-sim — virtual fleets against the real hub\n\n"
               "Usage: flotilla-sim <command> [options]   (each command has --help)\n\n"
               "  run         virtual devices (the real agent core, in memory) enroll, connect and run a\n"
               "              campaign; writes report.json and report.html\n"
               "  footprint   bytes per virtual device, no network\n"
               "  baseline    the raw mosquitto round trip of a campaign's messages (the limit)\n"
               "  k3d         N real k3s clusters in Docker (k3d), the real agent adopting each\n"
               "  worker      (internal) one process of 'run --mode direct --processes N'\n";
}

Result<double> get_share(const Options& o, const std::string& key) {
  try {
    size_t used = 0;
    const double v = std::stod(o.get(key), &used);
    if (used != o.get(key).size() || v < 0 || v > 1) throw std::invalid_argument("range");
    return v;
  } catch (const std::exception&) {
    return make_error(Errc::invalid_argument, key + " must be a share between 0 and 1, got '" + o.get(key) + "'");
  }
}

int fail(const Error& e) {
  std::fprintf(stderr, "flotilla-sim: %s\n", e.message.c_str());
  return 2;
}

// Parses a command's options; an exit code when the command should stop
// here (bad options, or --help answered).
std::optional<int> parse_or_exit(Options& o, int argc, char** argv) {
  auto pos = o.parse(argc, argv, 2);
  if (!pos) return fail(pos.error());
  if (o.help_requested()) {
    std::cout << o.help();
    return 0;
  }
  return std::nullopt;
}

// --mqtt-client: loop or paho.
Result<sim::MqttClient> mqtt_client(const Options& o) {
  const std::string v = o.get("mqtt-client");
  if (v == "loop") return sim::MqttClient::loop;
  if (v == "paho") return sim::MqttClient::paho;
  return make_error(Errc::invalid_argument, "mqtt-client must be loop or paho, got '" + v + "'");
}

int cmd_run(int argc, char** argv) {
  Options o("flotilla-sim run", "Virtual devices against the real hub: enroll, connect, run a campaign, report.",
            "FLOTILLA_SIM_");
  o.add("config", "YAML file with any of these keys")
      .add("hub", "hub REST URL; empty: start an own hub (flotilla-hub next to this binary)")
      .add("token-file", "file with an operator API token for --hub")
      .add("devices", "virtual devices", "100")
      .add("mode", "direct (one MQTT session per device) or gateway (many devices per session)", "gateway")
      .add("devices-per-gateway", "gateway mode: devices carried by one gateway session", "5000")
      .add("enroll-rate", "enrollments per second; 0 = as fast as the hub answers", "0")
      .add("enroll-threads", "concurrent enrollments", "4")
      .add("enroll-batch", "gateway mode: devices per batch enrollment request (1 = one request per device)",
           "1000")
      .add("gateway-flush-ms", "gateway mode: a gateway sends its devices' reports together, gathered for this "
                               "long (at most 1,000 per message); 0 = one message per report", "200")
      .add("workers", "threads running device cores", "1")
      .add("processes", "direct mode: simulator processes sharing the sessions (each has its own open-file "
                        "limit and its own MQTT client); this one drives the campaign", "1")
      .add("mqtt-client", "loop (every session of a process on one epoll thread) or paho (Paho C, as the agent "
                          "uses; its cost per message grows with the sessions in a process)", "loop")
      .add("seed", "makes fault assignment, identities and timings repeatable", "1")
      .add("offline", "share of devices offline during the campaign", "0")
      .add("flaky", "share of devices whose link drops once while applying", "0")
      .add("install-fail", "share of devices whose file writes fail", "0")
      .add("health-fail", "share of devices whose k3s never becomes healthy", "0")
      .add("reboot-mid-apply", "share of devices that lose power right after install", "0")
      .add("download-kbps", "artifact bandwidth per device in kbit/s; 0 = unlimited", "0")
      .add("clock-skew", "each device's clock is off by up to +/- this many seconds", "0")
      .add("artifact-bytes", "the bundle carries an artifact of this size (downloaded from the hub)", "0")
      .add("strategy", "campaign strategy as JSON (docs/api: Strategy)", "{}")
      .add("timeout", "give up waiting for convergence after this long", "10m")
      .add("out", "directory for report.json, report.html and the own hub", "flotilla-sim-out")
      .add("label", "value of the sim-run label the campaign selects (default: from seed and time)")
      .add_switch("serve-only", "enroll and serve the devices without creating a campaign: campaigns come from "
                                "elsewhere (REST, a federation); stops on SIGTERM/SIGINT or after --serve-for, "
                                "then reports what the devices applied; <out>/serving.json appears once they are "
                                "online at the hub")
      .add("serve-for", "serve only: stop serving after this long; 0 = until SIGTERM or SIGINT", "0")
      .add_list("root-key", "another bundle-signing public key (ed25519:<base64>) every device trusts, for "
                            "bundles signed elsewhere (repeatable)")
      .add_switch("no-progress", "no progress bar")
      .add("log-level", "log level", "warn")
      .config_file_key("config");
  if (auto done = parse_or_exit(o, argc, argv)) return *done;
  log::setup(o.get("log-level"));
  // Thousands of cores log every injected fault; keep the agent's own lines
  // for --log-level debug.
  if (o.get("log-level") != "debug" && o.get("log-level") != "trace") log::get("agent")->set_level(spdlog::level::err);
  sim::SimOptions so;
  so.hub_url = o.get("hub");
  if (!so.hub_url.empty()) {
    if (o.get("token-file").empty()) return fail(Error{Errc::invalid_argument, "--hub needs --token-file"});
    auto t = fs::read_file(o.get("token-file"), 4096);
    if (!t) return fail(t.error().with_context("token-file"));
    so.token = t->substr(0, t->find('\n'));
  }
  so.hub_bin = (std::filesystem::path(proc::self_exe()).parent_path() / "flotilla-hub").string();
  const auto num = [&](const char* key, int64_t lo, int64_t hi) -> Result<int64_t> { return o.get_int(key, lo, hi); };
  auto devices = num("devices", 1, 10'000'000);
  auto per = num("devices-per-gateway", 1, 1'000'000);
  auto threads = num("enroll-threads", 1, 256);
  auto batch = num("enroll-batch", 1, 1000);
  auto flush = num("gateway-flush-ms", 0, 60'000);
  auto workers = num("workers", 1, 64);
  auto processes = num("processes", 1, 64);
  auto seed = num("seed", 0, INT64_MAX);
  auto kbps = num("download-kbps", 0, 10'000'000);
  auto skew = num("clock-skew", 0, 10 * 365 * 86400);
  auto art = num("artifact-bytes", 0, 64 << 20);
  auto timeout = o.get_duration("timeout");
  auto serve_for = o.get_duration("serve-for");
  for (const auto* r : {&devices, &per, &threads, &batch, &flush, &workers, &processes, &seed, &kbps, &skew, &art}) {
    if (!*r) return fail(r->error());
  }
  if (!timeout) return fail(timeout.error());
  if (!serve_for) return fail(serve_for.error());
  so.devices = static_cast<uint32_t>(*devices);
  so.devices_per_gateway = static_cast<uint32_t>(*per);
  so.enroll_threads = static_cast<uint32_t>(*threads);
  so.enroll_batch = static_cast<uint32_t>(*batch);
  so.gateway_flush_ms = static_cast<uint32_t>(*flush);
  so.workers = static_cast<uint32_t>(*workers);
  so.processes = static_cast<uint32_t>(*processes);
  so.seed = static_cast<uint64_t>(*seed);
  so.faults.download_kbps = static_cast<uint32_t>(*kbps);
  so.faults.clock_skew_s = static_cast<uint32_t>(*skew);
  so.artifact_bytes = static_cast<uint32_t>(*art);
  so.timeout = std::chrono::duration_cast<std::chrono::seconds>(*timeout);
  auto client = mqtt_client(o);
  if (!client) return fail(client.error());
  so.mqtt_client = *client;
  if (o.get("mode") == "direct") so.mode = sim::Mode::direct;
  else if (o.get("mode") == "gateway") so.mode = sim::Mode::gateway;
  else return fail(Error{Errc::invalid_argument, "mode must be direct or gateway, got '" + o.get("mode") + "'"});
  try {
    so.enroll_rate = std::stod(o.get("enroll-rate"));
    if (so.enroll_rate < 0) throw std::invalid_argument("negative");
  } catch (const std::exception&) {
    return fail(Error{Errc::invalid_argument, "enroll-rate must be a number >= 0"});
  }
  struct Share {
    const char* key;
    double* into;
  };
  for (auto [key, into] : {Share{"offline", &so.faults.offline}, Share{"flaky", &so.faults.flaky},
                           Share{"install-fail", &so.faults.install_fail}, Share{"health-fail", &so.faults.health_fail},
                           Share{"reboot-mid-apply", &so.faults.reboot_mid_apply}}) {
    auto v = get_share(o, key);
    if (!v) return fail(v.error());
    *into = *v;
  }
  so.strategy = nlohmann::json::parse(o.get("strategy"), nullptr, false);
  if (so.strategy.is_discarded() || !so.strategy.is_object()) {
    return fail(Error{Errc::invalid_argument, "strategy must be a JSON object"});
  }
  so.work_dir = std::filesystem::absolute(o.get("out")).string();
  so.label = o.get("label");
  so.progress = !o.get_bool("no-progress");
  so.serve_only = o.get_bool("serve-only");
  so.serve_for = *serve_for;
  for (const auto& k : o.get_list("root-key")) {
    if (auto pk = bundles::parse_public_key_text(k); !pk) {
      return fail(Error{Errc::invalid_argument, "root-key '" + k + "': " + pk.error().message});
    }
    so.root_keys.push_back(k);
  }
  if (!so.serve_only && so.serve_for.count() > 0) {
    return fail(Error{Errc::invalid_argument, "--serve-for is for --serve-only (a campaign run stops when it converges)"});
  }
  if (so.serve_only && so.strategy != nlohmann::json::object()) {
    return fail(Error{Errc::invalid_argument, "--strategy has no effect with --serve-only (no campaign is created here)"});
  }
  if (so.serve_only && so.processes > 1) {
    return fail(Error{Errc::invalid_argument, "--serve-only runs in one process (use --mode gateway for large fleets)"});
  }
  if (so.processes > 1 && so.mode != sim::Mode::direct) {
    return fail(Error{Errc::invalid_argument, "--processes is for direct mode; a gateway session already carries "
                                              "thousands of devices (use --devices-per-gateway)"});
  }
  if (so.processes > so.devices) {
    return fail(Error{Errc::invalid_argument, "--processes " + std::to_string(so.processes) + " is more than --devices " +
                                                  std::to_string(so.devices)});
  }
  // A direct session is a socket: stay clear of the per-process open-file limit.
  if (so.mode == sim::Mode::direct) {
    const long max_files = ::sysconf(_SC_OPEN_MAX);
    const uint64_t per_process = (uint64_t{so.devices} + so.processes - 1) / so.processes;
    if (max_files > 0 && per_process + 200 > static_cast<uint64_t>(max_files)) {
      return fail(Error{Errc::invalid_argument,
                        "direct mode needs one socket per device: " + std::to_string(per_process) +
                            " devices per process exceed the open-file limit (" + std::to_string(max_files) +
                            "); raise --processes, or use --mode gateway"});
    }
  }
  if (so.serve_only) {
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGTERM, &sa, nullptr);
    ::sigaction(SIGINT, &sa, nullptr);
    so.stop = &g_stop;
  }
  auto report = sim::run(so);
  if (!report) return fail(report.error());
  if (so.serve_only) {
    const auto& sv = (*report)["serve"];
    std::printf("served %u devices for %s s (stopped by %s): phases %s, applied %s\n", so.devices,
                sv["served_s"].dump().c_str(), sv["stopped_by"].get<std::string>().c_str(), sv["phases"].dump().c_str(),
                sv["applied"].dump().c_str());
    std::printf("report: %s/report.json\n", so.work_dir.c_str());
    return 0;
  }
  const auto& f = (*report)["figures"];
  std::printf("campaign %s ended %s: %s devices finished, converged in %s s, p50 %s ms, p99 %s ms, p99.9 %s ms\n",
              (*report)["campaign"]["id"].get<std::string>().c_str(),
              (*report)["campaign"]["end_state"].get<std::string>().c_str(), f["finished_devices"].dump().c_str(),
              f["converged_s"].dump().c_str(), f["latency_p50_ms"].dump().c_str(), f["latency_p99_ms"].dump().c_str(),
              f["latency_p999_ms"].dump().c_str());
  std::printf("report: %s/report.json and %s/report.html\n", so.work_dir.c_str(), so.work_dir.c_str());
  return (*report)["figures"]["converged_s"].is_null() ? 1 : 0;
}

// Internal: one process of `run --mode direct --processes N`, started by it.
int cmd_worker(int argc, char** argv) {
  Options o("flotilla-sim worker",
            "Internal: one process of 'flotilla-sim run --mode direct --processes N', started by it.", "FLOTILLA_SIM_");
  o.add("spec", "the worker's spec, written by the driving process").add("log-level", "log level", "warn");
  if (auto done = parse_or_exit(o, argc, argv)) return *done;
  if (o.get("spec").empty()) return fail(Error{Errc::invalid_argument, "--spec is required"});
  log::setup(o.get("log-level"));
  if (o.get("log-level") != "debug" && o.get("log-level") != "trace") log::get("agent")->set_level(spdlog::level::err);
  if (auto s = sim::run_worker(o.get("spec")); !s) return fail(s.error());
  return 0;
}

int cmd_footprint(int argc, char** argv) {
  Options o("flotilla-sim footprint", "Resident bytes per virtual device after one full apply each (no network).",
            "FLOTILLA_SIM_");
  o.add("devices", "virtual devices", "100000").add("seed", "seed", "1");
  if (auto done = parse_or_exit(o, argc, argv)) return *done;
  auto n = o.get_int("devices", 1, 10'000'000);
  auto seed = o.get_int("seed", 0, INT64_MAX);
  if (!n) return fail(n.error());
  if (!seed) return fail(seed.error());
  log::setup("warn");
  std::cout << sim::measure_footprint(static_cast<uint32_t>(*n), static_cast<uint64_t>(*seed)).dump(2) << "\n";
  return 0;
}

int cmd_baseline(int argc, char** argv) {
  Options o("flotilla-sim baseline",
            "The raw mosquitto round trip of a campaign's messages (the limit the hub's throughput is compared to).",
            "FLOTILLA_SIM_");
  o.add("devices", "devices (one message out each)", "10000")
      .add("sessions", "device-side sessions", "2")
      .add("reports", "answers per device", "5")
      .add("flush-ms", "each session sends its answers together, gathered for this long (at most 1,000 per "
                       "message), like a gateway of 'flotilla-sim run'; 0 = one message per answer", "0")
      .add("mosquitto", "mosquitto binary", "/usr/sbin/mosquitto")
      .add("mqtt-client", "the device-side sessions' client, as in 'flotilla-sim run': loop or paho", "loop")
      .add("out", "scratch directory", "flotilla-sim-baseline");
  if (auto done = parse_or_exit(o, argc, argv)) return *done;
  auto n = o.get_int("devices", 1, 10'000'000);
  auto sessions = o.get_int("sessions", 1, 10'000);
  auto reports = o.get_int("reports", 1, 100);
  auto flush_ms = o.get_int("flush-ms", 0, 60'000);
  for (const auto* r : {&n, &sessions, &reports, &flush_ms}) {
    if (!*r) return fail(r->error());
  }
  auto client = mqtt_client(o);
  if (!client) return fail(client.error());
  log::setup("warn");
  auto r = sim::mqtt_baseline(std::filesystem::absolute(o.get("out")).string(), o.get("mosquitto"),
                              static_cast<uint32_t>(*n), static_cast<uint32_t>(*sessions),
                              static_cast<uint32_t>(*reports), static_cast<uint32_t>(*flush_ms), *client);
  if (!r) return fail(r.error());
  std::cout << r->dump(2) << "\n";
  return (*r)["complete"].get<bool>() ? 0 : 1;
}

int cmd_k3d(int argc, char** argv) {
  Options o("flotilla-sim k3d", "N k3s clusters in Docker (k3d), each adopted by a real flotilla-agent.",
            "FLOTILLA_SIM_");
  o.add("clusters", "clusters to create", "1")
      .add("hub", "hub REST URL the agents enroll with")
      .add("enrollment-token", "enrollment token for the agents")
      .add_list("root-key", "bundle-signing public key (ed25519:<b64>) the agents trust")
      .add("image", "k3s image for k3d (e.g. rancher/k3s:v1.30.4-k3s1)")
      .add("out", "directory for agent roots and logs", "flotilla-sim-k3d")
      .add_switch("dry-run", "print the commands, run nothing")
      .add_switch("keep", "leave the clusters when stopping");
  if (auto done = parse_or_exit(o, argc, argv)) return *done;
  auto n = o.get_int("clusters", 1, 1000);
  if (!n) return fail(n.error());
  sim::K3dOptions k;
  k.clusters = static_cast<uint32_t>(*n);
  k.hub_url = o.get("hub");
  k.enrollment_token = o.get("enrollment-token");
  k.root_keys = o.get_list("root-key");
  k.k3s_image = o.get("image");
  k.work_dir = std::filesystem::absolute(o.get("out")).string();
  k.agent_bin = (std::filesystem::path(proc::self_exe()).parent_path() / "flotilla-agent").string();
  k.dry_run = o.get_bool("dry-run");
  k.keep = o.get_bool("keep");
  return sim::run_k3d(k);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    usage();
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  if (cmd == "--version" || cmd == "version") {
    std::printf("flotilla-sim %s\n", flotilla::version());
    return 0;
  }
  if (cmd == "run") return cmd_run(argc, argv);
  if (cmd == "footprint") return cmd_footprint(argc, argv);
  if (cmd == "worker") return cmd_worker(argc, argv);
  if (cmd == "k3d") return cmd_k3d(argc, argv);
  if (cmd == "baseline") return cmd_baseline(argc, argv);
  std::fprintf(stderr, "flotilla-sim: unknown command '%s'\n", cmd.c_str());
  usage();
  return 2;
}
