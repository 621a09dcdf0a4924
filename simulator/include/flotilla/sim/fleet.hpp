#pragma once
// A virtual fleet: N devices running the real agent core (agent.hpp) over the
// in-memory seams (memory.hpp), enrolled with the real hub over REST and
// talking to the real broker over MQTT, either one session per device
// (direct) or many devices per gateway session (gateway).
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/common/result.hpp"

namespace flotilla::sim {

enum class Mode { direct, gateway };

// The MQTT client under the simulated sessions: every session of a process
// on one epoll thread (transport_loop.hpp), or Paho C, which the agent and
// the hub use (its cost per packet grows with the sessions in the process).
enum class MqttClient { loop, paho };
inline const char* mqtt_client_name(MqttClient c) { return c == MqttClient::paho ? "paho" : "loop"; }

// Shares of devices (0..1) that get each fault, drawn from the seed.
struct FaultProfile {
  double offline = 0;           // enroll, report once, then go away before the campaign
  double flaky = 0;             // the link drops once while a desired state arrives
  double install_fail = 0;      // writing the node's files fails
  double health_fail = 0;       // k3s never becomes healthy after the restart
  double reboot_mid_apply = 0;  // power cut right after install; recovery on "boot"
  uint32_t download_kbps = 0;   // artifact bandwidth per device; 0 = unlimited
  uint32_t clock_skew_s = 0;    // each device's clock off by up to ± this
};

// One device's faults (bits) and skew: a pure function of (seed, index).
enum Fault : uint8_t {
  kOffline = 1,
  kFlaky = 2,
  kInstallFail = 4,
  kHealthFail = 8,
  kRebootMidApply = 16,
};
struct DeviceFaults {
  uint8_t bits = 0;
  int32_t skew_s = 0;
};
DeviceFaults assign_faults(uint64_t seed, uint32_t index, const FaultProfile& p);

struct SimOptions {
  std::string hub_url;          // empty: start an own hub (self-contained)
  std::string token;            // operator API token (with --hub)
  std::string work_dir;         // scratch: own hub's data, report files
  std::string hub_bin;          // self-contained: flotilla-hub to start
  int hub_pid = 0;              // for RSS/CPU sampling; the own hub's pid when self-contained
  uint32_t devices = 100;
  Mode mode = Mode::gateway;
  uint32_t devices_per_gateway = 5000;
  double enroll_rate = 0;       // enrollments per second; 0 = as fast as the hub takes them
  uint32_t enroll_threads = 4;
  // Gateway mode: devices per POST /v1/enroll/batch; 1 = one POST /v1/enroll each.
  uint32_t enroll_batch = 1000;
  // Gateway mode: a gateway gathers its devices' reports for up to this long
  // (or 1,000 reports) and sends them as one GatewayReports message, as a
  // real IoT gateway batches telemetry; 0 = one MQTT message per report.
  uint32_t gateway_flush_ms = 200;
  uint32_t workers = 1;         // threads running device cores
  // Direct mode: simulator processes sharing the sessions. This process
  // drives the campaign; `processes` workers (flotilla-sim worker) each enroll
  // and run a contiguous share of the devices. Each process has its own
  // open-file limit and its own MQTT client.
  uint32_t processes = 1;
  MqttClient mqtt_client = MqttClient::loop;
  uint64_t seed = 1;
  FaultProfile faults;
  nlohmann::json strategy = nlohmann::json::object();
  uint32_t artifact_bytes = 0;  // > 0: the bundle carries an airgap artifact of this size
  std::chrono::seconds timeout{600};
  bool progress = true;         // a progress bar on stderr (when it is a terminal)
  std::string report_json;      // default <work_dir>/report.json
  std::string report_html;      // default <work_dir>/report.html
  std::string label;            // selector label value (default: derived from the seed and time)
  // Serve only: enroll the devices and serve them (reports, desired states,
  // faults) while someone else drives campaigns (a test, a federation); no
  // campaign is created or judged here. Serving ends when *stop turns true
  // (a signal) or after serve_for (0 = only then); the report then says what
  // each device applied.
  bool serve_only = false;
  std::chrono::milliseconds serve_for{0};
  const std::atomic<bool>* stop = nullptr;
  // More bundle-signing keys (ed25519:<base64>) every device pins besides the
  // seed's release key, so bundles signed elsewhere apply.
  std::vector<std::string> root_keys;
};

// Runs the whole scenario: enroll, connect, push a signed bundle, drive a
// campaign through REST, record the timeline, write the report (serve_only:
// enroll, serve, report what the devices applied). Returns the
// report document (also written to the files).
Result<nlohmann::json> run(const SimOptions& opts);

// One worker of a multi-process direct run (`flotilla-sim worker --spec F`):
// the spec (JSON, written 0600 by the driving process because it holds the
// enrollment token) names the fleet and the worker's share. The worker writes
// status.json next to the spec every half second and stops when a file
// named `stop` appears there.
Status run_worker(const std::string& spec_path);

// Renders the self-contained HTML page (inline SVG) for a report.
std::string render_html(const nlohmann::json& report);

// Footprint of the device core without any network: builds n devices, runs
// one full apply on each, and measures resident bytes per device.
nlohmann::json measure_footprint(uint32_t n, uint64_t seed);

// The raw broker round trip of a campaign's messages: `devices` QoS 1
// messages out from one "hub" session, `reports` QoS 1 answers each back from
// `sessions` device-side sessions, through a bare mosquitto it starts.
// With flush_ms > 0 each session gathers its reports for that long (at most
// 1,000 per message), like a gateway of `flotilla-sim run`. The device-side
// sessions use `client`, as the simulator's do; the "hub" uses Paho.
Result<nlohmann::json> mqtt_baseline(const std::string& work_dir, const std::string& mosquitto_bin, uint32_t devices,
                                     uint32_t sessions, uint32_t reports, uint32_t flush_ms = 0,
                                     MqttClient client = MqttClient::loop);

}  // namespace flotilla::sim
