// The limit the hub is measured against: the same number of MQTT messages,
// in the same shape (one QoS 1 desired state per device out, `reports` QoS 1
// reports per device back), through a bare mosquitto with the same session
// layout, and nothing else — no SQLite, no campaign engine, no agent core.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <filesystem>
#include <map>
#include <thread>

#include "flotilla/common/fs.hpp"
#include "flotilla/common/process.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/common/transport_loop.hpp"
#include "flotilla/sim/fleet.hpp"
#include "sim_internal.hpp"

namespace flotilla::sim {

using nlohmann::json;

namespace {
// A port the kernel just handed out and released (mosquitto binds it next).
Result<int> free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return make_error(Errc::io, "socket failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  ::close(fd);
  if (!ok) return make_error(Errc::io, "no free port on 127.0.0.1");
  return static_cast<int>(ntohs(addr.sin_port));
}
}  // namespace

Result<json> mqtt_baseline(const std::string& work_dir, const std::string& mosquitto_bin, uint32_t devices,
                           uint32_t sessions, uint32_t reports, uint32_t flush_ms, MqttClient client) {
  std::error_code ec;
  std::filesystem::create_directories(work_dir, ec);
  auto port = free_port();
  if (!port) return port.error();
  const std::string conf = work_dir + "/baseline-mosquitto.conf";
  (void)fs::write_file_atomic(conf,
                              "per_listener_settings false\nallow_anonymous true\npersistence false\n"
                              "max_queued_messages 1000000\nmax_inflight_messages 100\nlog_dest stderr\n"
                              "log_type error\nconnection_messages false\nuser root\nlistener " +
                                  std::to_string(*port) + " 127.0.0.1\n",
                              0644);
  proc::SpawnOptions so;
  so.argv = {mosquitto_bin, "-c", conf};
  so.stdout_path = work_dir + "/baseline-mosquitto.log";
  so.stderr_path = "stdout";
  so.die_with_parent = true;
  auto broker = proc::spawn(so);
  if (!broker) return broker.error().with_context("start " + mosquitto_bin);
  struct Stop {
    proc::Child& c;
    ~Stop() { c.terminate(std::chrono::seconds(5)); }
  } stop{*broker};
  const std::string url = "tcp://127.0.0.1:" + std::to_string(*port);

  std::atomic<uint64_t> reports_seen{0}, desired_seen{0};
  // The device side's sessions on the simulator's client; the hub's on
  // Paho, as flotilla-hub's. The loop outlives the sessions made on it.
  auto loop = client == MqttClient::loop ? transport::make_session_loop() : nullptr;
  auto connect = [&](const std::string& id, int window, int pending,
                     bool device_side = true) -> Result<std::unique_ptr<transport::Transport>> {
    auto t = device_side && loop ? transport::make_loop_transport(loop) : transport::make_paho_transport();
    transport::ConnectOptions co;
    co.url = url;
    co.client_id = id;
    co.max_inflight = window;
    co.max_pending = pending;
    Status st;
    for (int i = 0; i < 100; ++i) {
      if ((st = t->connect(co))) return t;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return st.error();
  };
  // The hub side: one session, like flotilla-hub.
  auto hub = connect("baseline-hub", 1000, 2000, false);  // as flotilla-hub connects
  if (!hub) return hub.error();
  constexpr size_t kReportBytes = 120;
  (*hub)->on_message([&](transport::Message&& m) {
    // A batch (b/<session>/reports) carries its answers back to back.
    const uint64_t n = m.topic.ends_with("/reports") ? m.payload.size() / kReportBytes : 1;
    reports_seen.fetch_add(n, std::memory_order_relaxed);
  });
  if (auto s = (*hub)->subscribe("b/+/d/+/report", 1); !s) return s.error();
  if (auto s = (*hub)->subscribe("b/+/reports", 1); !s) return s.error();
  // The device side: `sessions` gateway sessions; each desired state is
  // answered with `reports` reports from the session that got it, published
  // by one worker thread with the simulator's retry (as the fleet does).
  std::vector<std::unique_ptr<transport::Transport>> gws;
  std::mutex q_mu;
  std::condition_variable q_cv;
  std::deque<std::pair<transport::Transport*, std::string>> queue;
  std::atomic<bool> done{false};
  // With flush_ms: each session's answers gathered, as a gateway does.
  struct Gathered {
    std::mutex mu;
    std::string topic, bytes;
  };
  std::vector<std::unique_ptr<Gathered>> gathered;
  std::map<transport::Transport*, Gathered*> gathered_by;
  auto flush = [&](transport::Transport& t, Gathered& g, size_t at_least) {
    std::lock_guard lock(g.mu);
    if (g.bytes.empty() || g.bytes.size() < at_least) return;
    (void)publish_retrying(t, {g.topic, std::move(g.bytes), 1, false});
    g.bytes.clear();
  };
  for (uint32_t g = 0; g < sessions; ++g) {
    // Paced like the simulator's gateway sessions, so both pay the same
    // client-library cost and the ratio measures the hub.
    auto t = connect("baseline-gw-" + std::to_string(g), gateway_window(sessions), gateway_window(sessions));
    if (!t) return t.error();
    auto* raw = t->get();
    const std::string prefix = "b/" + std::to_string(g) + "/d/";
    raw->on_message([raw, &desired_seen, &q_mu, &q_cv, &queue](transport::Message&& m) {
      desired_seen.fetch_add(1, std::memory_order_relaxed);
      {
        std::lock_guard lock(q_mu);
        queue.emplace_back(raw, m.topic.substr(0, m.topic.size() - std::string("desired").size()) + "report");
      }
      q_cv.notify_one();
    });
    if (auto s = raw->subscribe(prefix + "+/desired", 1); !s) return s.error();
    gathered.push_back(std::make_unique<Gathered>());
    gathered.back()->topic = "b/" + std::to_string(g) + "/reports";
    gathered_by[raw] = gathered.back().get();
    gws.push_back(std::move(*t));
  }
  std::thread answerer([&] {
    for (;;) {
      std::pair<transport::Transport*, std::string> job;
      {
        std::unique_lock lock(q_mu);
        q_cv.wait_for(lock, std::chrono::milliseconds(100), [&] { return done || !queue.empty(); });
        if (done) return;
        if (queue.empty()) continue;
        job = std::move(queue.front());
        queue.pop_front();
      }
      for (uint32_t k = 0; k < reports; ++k) {
        if (flush_ms == 0) {
          (void)publish_retrying(*job.first, {job.second, std::string(kReportBytes, 'r'), 1, false});
          continue;
        }
        Gathered& g = *gathered_by[job.first];
        {
          std::lock_guard lock(g.mu);
          g.bytes.append(kReportBytes, 'r');
        }
        flush(*job.first, g, 1000 * kReportBytes);
      }
    }
  });
  std::thread flusher([&] {
    while (flush_ms > 0 && !done) {
      std::this_thread::sleep_for(std::chrono::milliseconds(flush_ms));
      for (size_t g = 0; g < gws.size(); ++g) flush(*gws[g], *gathered[g], 0);
    }
  });
  struct Join {
    std::atomic<bool>& done;
    std::thread& t;
    std::thread& f;
    ~Join() {
      done = true;
      t.join();
      f.join();
    }
  } join{done, answerer, flusher};
  const std::string payload(600, 'd');  // about a desired state with a small bundle
  const auto t0 = std::chrono::steady_clock::now();
  const uint32_t per = (devices + sessions - 1) / std::max<uint32_t>(1, sessions);
  for (uint32_t i = 0; i < devices; ++i) {
    const std::string topic = "b/" + std::to_string(i / per) + "/d/" + std::to_string(i) + "/desired";
    (void)publish_retrying(**hub, {topic, payload, 1, false});
  }
  const uint64_t want = uint64_t{devices} * reports;
  const auto deadline = t0 + std::chrono::minutes(30);
  while (reports_seen.load() < want && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const uint64_t msgs = desired_seen.load() + reports_seen.load();
  return json{{"devices", devices},
              {"sessions", sessions},
              {"reports_per_device", reports},
              {"flush_ms", flush_ms},
              {"messages", msgs},
              {"complete", reports_seen.load() >= want},
              {"seconds", secs},
              {"messages_per_s", msgs / std::max(secs, 1e-9)}};
}

}  // namespace flotilla::sim
