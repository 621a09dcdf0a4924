// [unit] /metrics: the standard process metrics from /proc/self, and
// per-campaign series only for campaigns in flight.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <chrono>
#include <fcntl.h>

#include "flotilla/hub/metrics.hpp"
#include "tests/support/campaign_fleet.hpp"

using namespace flotilla;
using namespace flotilla::hub;
using namespace flotilla::test;

TEST_CASE("process metrics are read from /proc/self", "[unit][hub][metrics]") {
  const auto before = read_process_stats();
  CHECK(before.resident_memory_bytes > 0);
  CHECK(before.virtual_memory_bytes >= before.resident_memory_bytes);
  CHECK(before.open_fds >= 3);
  CHECK((before.max_fds == -1 || before.max_fds >= before.open_fds));
  const double now =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  CHECK(before.start_time_seconds > 1.6e9);
  CHECK(before.start_time_seconds <= now + 1);
  // An opened file shows: the count is this process's, not a constant.
  const int fd = ::open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  const auto after = read_process_stats();
  ::close(fd);
  CHECK(after.open_fds == before.open_fds + 1);
  CHECK(after.cpu_seconds >= before.cpu_seconds);
}

TEST_CASE("/metrics has per-campaign series only for campaigns in flight, and process metrics",
          "[unit][hub][metrics]") {
  Fleet f;
  f.enroll(4);
  const auto done = f.create(
      json::parse(R"({"max_in_flight": 2, "failure_threshold": {"percent": 50, "min_sample": 2, "action": "abort"}})"),
      f.bundle(1));
  f.hub->tick();
  for (const auto& d : f.in_flight(done)) f.report(d, v1::AGENT_STATE_REFUSED, v1::REASON_UNKNOWN_KEY);
  f.hub->tick();
  REQUIRE(f.view(done).campaign.state == "aborted");
  const auto live = f.create(json::parse(R"({"max_in_flight": 1})"), f.bundle(2));
  f.hub->tick();
  REQUIRE(f.view(live).campaign.state == "running");

  HttpMetrics http;
  http.count("GET", "/v1/devices/{id}", 404);
  http.count("GET", "/v1/devices/{id}", 200);
  const std::string page = render_metrics(*f.hub, http);
  INFO(page);
  CHECK(page.find("flotilla_campaign_devices{campaign=\"" + live + "\"") != std::string::npos);
  CHECK(page.find("campaign=\"" + done + "\"") == std::string::npos);
  // The aborted campaign still counts among campaigns by state.
  CHECK(page.find("flotilla_campaigns{state=\"aborted\"} 1") != std::string::npos);
  // The exact status, not a class.
  CHECK(page.find("flotilla_http_requests_total{method=\"GET\",route=\"/v1/devices/{id}\",code=\"404\"} 1") !=
        std::string::npos);
  CHECK(page.find("code=\"4xx\"") == std::string::npos);
  for (const char* family : {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                             "process_max_fds", "process_start_time_seconds", "process_virtual_memory_bytes"}) {
    INFO(family);
    CHECK(page.find(std::string("# TYPE ") + family + " ") != std::string::npos);
  }
}
