// [integration] The flotilla CLI's read-your-writes across hub processes
// (docs/operations.md, "Several hub processes"): each call after the first
// sends the highest X-Flotilla-Revision any answer of this run carried as
// X-Flotilla-Min-Revision. The hub side is a stand-in on loopback playing a
// load balancer over hubs at different revisions (one answer comes from a
// hub that is behind), so the test can see every header the CLI sent.
#include <catch2/catch.hpp>

#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/common/process.hpp"
#include "flotilla/hub/http_server.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using nlohmann::json;

TEST_CASE("CLI: a call asks for at least the highest revision an earlier answer carried, never a lower one",
          "[integration][cli]") {
  // Revisions of the answers, in order: the third comes from a hub behind
  // the others; the CLI must keep asking for 9, not drop to 7.
  const std::vector<std::string> revisions = {"5", "9", "7", "12", ""};
  std::mutex mu;
  std::vector<std::string> asked;  // X-Flotilla-Min-Revision of each call, "" = none
  hub::HttpServerConfig hc;
  hc.port = 0;
  hc.threads = 2;
  auto server = hub::HttpServer::start(hc, [&](const hub::HttpRequest& req) {
    std::lock_guard lock(mu);
    auto h = req.headers.find("x-flotilla-min-revision");
    asked.push_back(h == req.headers.end() ? "" : h->second);
    const size_t n = asked.size();
    hub::HttpResponse r;
    r.status = 200;
    r.content_type = "application/json";
    const bool last = n >= revisions.size();
    r.body = json{{"id", "c-1"},
                  {"name", "edge"},
                  {"state", last ? "completed" : "running"},
                  {"counts", {{"total", 4}, {"applied", static_cast<int>(n) - 1}}},
                  {"waves", json::array()}}
                 .dump();
    if (!revisions[std::min(n, revisions.size()) - 1].empty()) {
      r.headers["X-Flotilla-Revision"] = revisions[std::min(n, revisions.size()) - 1];
    }
    return r;
  });
  REQUIRE(server);
  const std::string url = "http://127.0.0.1:" + std::to_string((*server)->port());
  auto run = proc::run({test::bin_dir() + "/flotilla", "campaign", "watch", "c-1", "--interval", "20ms", "-o", "json",
                        "--hub", url, "--token", "flt_api_standin"},
                       std::chrono::seconds(60));
  (*server)->stop();
  REQUIRE(run);
  INFO(run->out << run->err);
  CHECK(run->exit_code == 0);
  std::lock_guard lock(mu);
  // The first call knows no revision; an answer without one (the last)
  // changes nothing.
  CHECK(asked == std::vector<std::string>{"", "5", "9", "9", "12"});
}
