// [unit] http::send_retrying against a real HTTP server on loopback: what a
// server asks to repeat (503/429 with Retry-After) is repeated for reads only,
// within the caller's budget; everything else comes back as it was answered.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <string>
#include <vector>

#include "flotilla/common/http_client.hpp"
#include "flotilla/hub/http_server.hpp"

using namespace flotilla;
using namespace std::chrono_literals;

namespace {

// Answers `busy` (with Retry-After: `retry_after` unless empty) to the first
// `refusals` requests, then 200 "done"; counts every request.
struct BusyServer {
  std::atomic<int> seen{0};
  int refusals = 0;
  int busy = 503;
  std::string retry_after = "0";
  std::unique_ptr<hub::HttpServer> server;

  void start() {
    hub::HttpServerConfig hc;
    hc.port = 0;
    auto s = hub::HttpServer::start(hc, [this](const hub::HttpRequest&) {
      hub::HttpResponse r;
      if (seen++ < refusals) {
        r.status = busy;
        r.body = R"({"error":{"code":"unavailable","message":"not yet"}})";
        if (!retry_after.empty()) r.headers["Retry-After"] = retry_after;
      } else {
        r.body = "done";
      }
      return r;
    });
    REQUIRE(s);
    server = std::move(*s);
  }
  http::Request request(const std::string& method) const {
    http::Request r;
    r.method = method;
    r.url = "http://127.0.0.1:" + std::to_string(server->port()) + "/v1/thing";
    if (method != "GET" && method != "HEAD") r.body = "{}";
    return r;
  }
};

}  // namespace

TEST_CASE("send_retrying repeats a read the server asks to repeat, says so each time, and returns the answer",
          "[unit][common][http]") {
  BusyServer s;
  s.refusals = 2;
  s.start();
  std::vector<int> told;
  http::RetryPolicy p;
  p.on_wait = [&](const http::Response& r, std::chrono::milliseconds wait) {
    told.push_back(r.status);
    CHECK(wait >= 100ms);  // Retry-After: 0 still waits a little
    CHECK_THAT(r.body, Catch::Contains("not yet"));
  };
  auto r = http::send_retrying(s.request("GET"), p);
  REQUIRE(r);
  CHECK(r->status == 200);
  CHECK(r->body == "done");
  CHECK(s.seen == 3);
  CHECK(told == std::vector<int>{503, 503});

  SECTION("429 too") {
    BusyServer t;
    t.refusals = 1;
    t.busy = 429;
    t.start();
    auto again = http::send_retrying(t.request("GET"), {});
    REQUIRE(again);
    CHECK(again->status == 200);
    CHECK(t.seen == 2);
  }
}

TEST_CASE("send_retrying never repeats a write, nor a refusal without Retry-After, nor past its budget",
          "[unit][common][http]") {
  SECTION("a write is answered once: only its caller can tell whether it was done") {
    BusyServer s;
    s.refusals = 1;
    s.start();
    for (const char* m : {"POST", "PUT", "DELETE"}) {
      s.seen = 0;
      auto r = http::send_retrying(s.request(m), {});
      REQUIRE(r);
      CHECK(r->status == 503);
      CHECK(s.seen == 1);
    }
  }
  SECTION("a 503 without Retry-After is returned as it came") {
    BusyServer s;
    s.refusals = 1;
    s.retry_after.clear();
    s.start();
    auto r = http::send_retrying(s.request("GET"), {});
    REQUIRE(r);
    CHECK(r->status == 503);
    CHECK(s.seen == 1);
  }
  SECTION("waits stop at the budget, and the last refusal is returned") {
    BusyServer s;
    s.refusals = 100;
    s.retry_after = "1";
    s.start();
    http::RetryPolicy p;
    p.budget = 2500ms;  // two waits of a second fit, a third does not
    int waits = 0;
    p.on_wait = [&](const http::Response&, std::chrono::milliseconds wait) {
      ++waits;
      CHECK(wait == 1000ms);
    };
    auto r = http::send_retrying(s.request("GET"), p);
    REQUIRE(r);
    CHECK(r->status == 503);
    CHECK(waits == 2);
    CHECK(s.seen == 3);
  }
  SECTION("a Retry-After longer than max_wait is cut to it") {
    BusyServer s;
    s.refusals = 1;
    s.retry_after = "3600";
    s.start();
    http::RetryPolicy p;
    p.max_wait = 200ms;
    std::chrono::milliseconds waited{0};
    p.on_wait = [&](const http::Response&, std::chrono::milliseconds wait) { waited = wait; };
    auto r = http::send_retrying(s.request("GET"), p);
    REQUIRE(r);
    CHECK(r->status == 200);
    CHECK(waited == 200ms);
  }
}
