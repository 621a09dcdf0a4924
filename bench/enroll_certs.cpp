// bench/enroll_certs: direct enrollment with certificates against a running
// hub (issue 16). Enrolls N new identities, each with its own Ed25519 key and
// certificate request, from T threads, and at every checkpoint prints the
// rate of the last stretch, the embedded broker's resident memory, the size
// of every file in the broker's directory (config, ACL, TLS files, CRL;
// state/ and the log excluded) and the hub's broker reload count: what must
// not grow with the number of identities.
//
//   build/bin/enroll_certs HUB_DATA_DIR N [THREADS] [CHECKPOINTS] [new|keep-alive]
//
// HUB_DATA_DIR is the hub's --data-dir (hub.url, admin.token, broker/ are
// read from it). Keys and requests are made before the clock starts, so the
// figure is the hub's rate, not the client's key generation. `new` (the
// default) opens a TCP connection per enrollment, as devices do (each
// enrolls once); `keep-alive` sends a thread's requests over one HTTP/1.1
// connection, as a provisioning station enrolling many devices would.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/http_client.hpp"
#include "flotilla/common/x509.hpp"
#include "flotilla/v1/enroll.pb.h"

using namespace flotilla;
namespace stdfs = std::filesystem;
using Steady = std::chrono::steady_clock;

namespace {

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  return s;
}

long broker_rss_kib(const stdfs::path& data) {
  auto pid = fs::read_file(data / "broker/mosquitto.pid", 64);
  if (!pid) return -1;
  auto status = fs::read_file("/proc/" + trim(*pid) + "/status", 1 << 16);
  if (!status) return -1;
  const auto at = status->find("VmRSS:");
  return at == std::string::npos ? -1 : std::atol(status->c_str() + at + 6);
}

// Bytes of every file mosquitto reads: all of broker/ but its state and log.
uintmax_t broker_config_bytes(const stdfs::path& data) {
  uintmax_t total = 0;
  std::error_code ec;
  for (auto it = stdfs::recursive_directory_iterator(data / "broker", ec); it != stdfs::recursive_directory_iterator();
       it.increment(ec)) {
    const auto rel = it->path().lexically_relative(data / "broker").string();
    if (rel.rfind("state", 0) == 0 || rel == "mosquitto.log" || rel == "mosquitto.pid") continue;
    if (it->is_regular_file(ec)) total += it->file_size(ec);
  }
  return total;
}

std::string metric(const std::string& url, const std::string& token, const std::string& name) {
  http::Request r;
  r.url = url + "/metrics";
  r.headers["Authorization"] = "Bearer " + token;
  auto resp = http::send(r);
  if (!resp || resp->status != 200) return "?";
  const auto at = resp->body.find("\n" + name + " ");
  if (at == std::string::npos) return "?";
  return trim(resp->body.substr(at + name.size() + 2, resp->body.find('\n', at + 1) - at - name.size() - 2));
}

// One HTTP/1.1 connection kept open across requests (plain http only: the
// bench talks to the hub on loopback); reconnects once if the hub closed it.
class KeepAlive {
 public:
  explicit KeepAlive(const http::Url& url) : url_(url), stream_(ioc_) {}
  Result<http::Response> post(const std::string& body, const std::string& content_type) {
    namespace bhttp = boost::beast::http;
    for (int attempt = 0; attempt < 2; ++attempt) {
      boost::beast::error_code ec;
      if (!open_) {
        boost::asio::ip::tcp::resolver resolver(ioc_);
        auto results = resolver.resolve(url_.host, url_.port, ec);
        if (!ec) stream_.connect(results, ec);
        if (ec) return make_error(Errc::unavailable, "connect: " + ec.message(), true);
        open_ = true;
      }
      bhttp::request<bhttp::string_body> r{bhttp::verb::post, "/v1/enroll", 11};
      r.set(bhttp::field::host, url_.host);
      r.set(bhttp::field::content_type, content_type);
      r.keep_alive(true);
      r.body() = body;
      r.prepare_payload();
      stream_.expires_after(std::chrono::seconds(30));
      bhttp::write(stream_, r, ec);
      bhttp::response<bhttp::string_body> res;
      if (!ec) bhttp::read(stream_, buffer_, res, ec);
      if (ec) {
        stream_.close();
        open_ = false;
        buffer_.clear();
        if (attempt == 0) continue;  // the hub may close an idle connection
        return make_error(Errc::unavailable, "POST: " + ec.message(), true);
      }
      if (!res.keep_alive()) {
        stream_.close();
        open_ = false;
        buffer_.clear();
      }
      http::Response out;
      out.status = static_cast<int>(res.result_int());
      out.body = std::move(res.body());
      return out;
    }
    return make_error(Errc::unavailable, "POST: no connection", true);
  }

 private:
  http::Url url_;
  boost::asio::io_context ioc_;
  boost::beast::tcp_stream stream_;
  boost::beast::flat_buffer buffer_;
  bool open_ = false;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s HUB_DATA_DIR N [THREADS] [CHECKPOINTS] [new|keep-alive]\n", argv[0]);
    return 2;
  }
  const stdfs::path data = argv[1];
  const int n = std::atoi(argv[2]);
  const int threads = argc > 3 ? std::atoi(argv[3]) : 16;
  const int checkpoints = argc > 4 ? std::atoi(argv[4]) : 4;
  const std::string connections = argc > 5 ? argv[5] : "new";
  if (connections != "new" && connections != "keep-alive") {
    std::fprintf(stderr, "connections must be 'new' or 'keep-alive', not '%s'\n", connections.c_str());
    return 2;
  }
  const std::string url = trim(fs::read_file(data / "hub.url", 256).value_or(""));
  const std::string admin = trim(fs::read_file(data / "admin.token", 256).value_or(""));
  if (url.empty() || admin.empty() || n <= 0 || threads <= 0 || checkpoints <= 0) {
    std::fprintf(stderr, "no hub.url/admin.token in %s, or a bad number\n", data.c_str());
    return 2;
  }
  // One token for all of them, without the per-token rate limit's effect
  // on a load run (the hub must run with --enroll-rate 0 --enroll-rate-per-token 0).
  http::Request tr;
  tr.method = "POST";
  tr.url = url + "/v1/enrollment-tokens";
  tr.headers["Authorization"] = "Bearer " + admin;
  tr.headers["Content-Type"] = "application/json";
  tr.body = nlohmann::json{{"name", "enroll_certs bench"}, {"labels", {{"bench", "enroll-certs"}}}, {"ttl", "24h"},
                           {"max_uses", n}}
                .dump();
  auto made = http::send(tr);
  if (!made || made->status != 201) {
    std::fprintf(stderr, "token: %s\n", made ? made->body.c_str() : made.error().message.c_str());
    return 1;
  }
  const std::string token = nlohmann::json::parse(made->body)["token"].get<std::string>();

  // Keys and CSRs first: the clock measures the hub.
  std::vector<bundles::KeyPair> keys(static_cast<size_t>(n));
  std::vector<std::string> csrs(static_cast<size_t>(n));
  {
    std::vector<std::thread> ts;
    for (int t = 0; t < 2; ++t) {
      ts.emplace_back([&, t] {
        for (int i = t; i < n; i += 2) {
          keys[i] = bundles::generate_key();
          csrs[i] = x509::make_csr(keys[i].secret, bundles::device_id_for_key(keys[i].pub.key)).value();
        }
      });
    }
    for (auto& t : ts) t.join();
  }
  auto parsed = http::parse_url(url);
  if (!parsed || parsed->scheme != "http") {
    std::fprintf(stderr, "hub.url '%s' is not a plain http:// URL\n", url.c_str());
    return 2;
  }
  std::printf("hub %s, %d identities, %d threads, %s connections\n", url.c_str(), n, threads,
              connections == "new" ? "one new" : "kept-alive");
  std::printf("%10s %10s %12s %14s %16s %8s\n", "enrolled", "rate/s", "broker_rss", "broker_files_B", "broker_reloads",
              "errors");
  std::printf("%10d %10s %9ld KiB %14ju %16s %8d\n", 0, "-", broker_rss_kib(data), broker_config_bytes(data),
              metric(url, admin, "flotilla_broker_reloads_total").c_str(), 0);
  std::fflush(stdout);

  std::atomic<int> next{0}, errors{0};
  const int per_stretch = (n + checkpoints - 1) / checkpoints;
  const auto t0 = Steady::now();
  for (int c = 0; c < checkpoints; ++c) {
    const int end = std::min(n, (c + 1) * per_stretch);
    const auto s0 = Steady::now();
    const int begin = next.load();
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&] {
        std::optional<KeepAlive> conn;
        if (connections == "keep-alive") conn.emplace(*parsed);
        for (int i; (i = next.fetch_add(1)) < end;) {
          v1::EnrollRequest req;
          const auto& k = keys[i];
          req.set_enrollment_token(token);
          req.set_device_public_key(std::string(k.pub.key.begin(), k.pub.key.end()));
          req.set_hostname("bench-" + std::to_string(i));
          req.set_arch("amd64");
          const auto issued = static_cast<uint64_t>(SystemClock::instance().now_unix_ms());
          req.set_issued_unix_ms(issued);
          const Bytes proof = bundles::sign_detached(k, bundles::enroll_proof_message(token, k.pub.key, issued));
          req.set_proof(std::string(proof.begin(), proof.end()));
          req.set_csr(csrs[i]);
          Result<http::Response> resp = make_error(Errc::internal, "unsent");
          if (conn) {
            resp = conn->post(req.SerializeAsString(), "application/x-protobuf");
          } else {
            http::Request r;
            r.method = "POST";
            r.url = url + "/v1/enroll";
            r.body = req.SerializeAsString();
            r.headers["Content-Type"] = "application/x-protobuf";
            resp = http::send(r);
          }
          v1::EnrollResponse er;
          if (!resp || resp->status != 200 || !er.ParseFromString(resp->body) || er.client_certificate().empty()) {
            if (errors.fetch_add(1) < 5) {
              std::fprintf(stderr, "enroll %d: %s\n", i,
                           resp ? (std::to_string(resp->status) + " " + resp->body.substr(0, 200)).c_str()
                                : resp.error().message.c_str());
            }
          }
        }
      });
    }
    for (auto& t : ts) t.join();
    next = end;
    const double secs = std::chrono::duration<double>(Steady::now() - s0).count();
    std::printf("%10d %10.0f %9ld KiB %14ju %16s %8d\n", end, (end - begin) / secs, broker_rss_kib(data),
                broker_config_bytes(data), metric(url, admin, "flotilla_broker_reloads_total").c_str(), errors.load());
    std::fflush(stdout);
  }
  const double total = std::chrono::duration<double>(Steady::now() - t0).count();
  std::printf("total: %d enrollments in %.1f s = %.0f/s, %d errors\n", n, total, n / total, errors.load());
  return errors.load() == 0 ? 0 : 1;
}
