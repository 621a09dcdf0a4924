// The REST API over TLS (issue 4): the real hub with --tls-cert/--tls-key and
// a throwaway CA made with the openssl command line, the real CLI with
// --ca-file, and the ways a connection must fail: plain HTTP to the TLS port,
// an untrusted CA, a certificate for another name, half a TLS setup.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>

#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

// proc::run does not search PATH.
std::string openssl_bin() {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  for (size_t start = 0; start <= dirs.size();) {
    const size_t end = std::min(dirs.find(':', start), dirs.size());
    const stdfs::path candidate = stdfs::path(dirs.substr(start, end - start)) / "openssl";
    if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
    start = end + 1;
  }
  throw std::runtime_error("the openssl command is not installed (scripts/setup.sh installs it)");
}

// CA + server certificate for 127.0.0.1 (IP SAN only) in dir; P-256 keeps it fast.
void make_pki(const stdfs::path& dir) {
  auto openssl = [](std::vector<std::string> args) {
    args.insert(args.begin(), openssl_bin());
    auto r = proc::run(args, std::chrono::seconds(30));
    if (!r || r->exit_code != 0) {
      throw std::runtime_error("openssl " + args[1] + " failed: " + (r ? r->err : r.error().message));
    }
  };
  const auto p = [&](const char* name) { return (dir / name).string(); };
  openssl({"req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
           p("ca.key"), "-out", p("ca.pem"), "-days", "2", "-subj", "/CN=flotilla test CA", "-addext",
           "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"});
  std::ofstream(dir / "ext.cnf") << "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
  openssl({"req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", p("hub.key"),
           "-out", p("hub.csr"), "-subj", "/CN=flotilla hub"});
  openssl({"x509", "-req", "-in", p("hub.csr"), "-CA", p("ca.pem"), "-CAkey", p("ca.key"), "-CAcreateserial",
           "-out", p("hub.pem"), "-days", "2", "-extfile", p("ext.cnf")});
  // A key that belongs to no certificate here, for the mismatch case.
  openssl({"genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", p("other.key")});
}

}  // namespace

TEST_CASE("the hub serves its REST API over TLS only, to clients that trust its CA", "[integration][tls]") {
  TempDir tmp;
  make_pki(tmp.path());
  const std::string ca = (tmp.path() / "ca.pem").string();
  Hub hub(tmp.path() / "hub");
  hub.start({"--tls-cert", (tmp.path() / "hub.pem").string(), "--tls-key", (tmp.path() / "hub.key").string()}, ca);
  REQUIRE(hub.url().rfind("https://127.0.0.1:", 0) == 0);
  const std::string port = hub.url().substr(hub.url().rfind(':') + 1);

  SECTION("the CLI with --ca-file lists devices over https") {
    auto r = hub.cli({"device", "list", "-o", "json"});
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    auto j = json::parse(r.out, nullptr, false);
    REQUIRE(!j.is_discarded());
    auto [status, body] = hub.call("GET", "/v1/devices");
    CHECK(status == 200);
    CHECK(body["items"].is_array());
  }

  SECTION("plain HTTP to the TLS port gets no answer in clear") {
    http::Request r;
    r.url = "http://127.0.0.1:" + port + "/v1/devices";
    r.headers["Authorization"] = "Bearer " + hub.admin_token();
    r.timeout = std::chrono::seconds(5);
    auto resp = http::send(r);
    INFO((resp ? "got HTTP " + std::to_string(resp->status) + ": " + resp->body : resp.error().message));
    CHECK(!resp);
    // The hub stays up and keeps serving TLS clients.
    CHECK(hub.call("GET", "/v1/devices").first == 200);
  }

  SECTION("a client without the CA is refused with a certificate error") {
    http::Request r;
    r.url = hub.url() + "/readyz";  // system trust store only
    r.timeout = std::chrono::seconds(5);
    auto resp = http::send(r);
    REQUIRE(!resp);
    INFO(resp.error().message);
    CHECK(resp.error().message.find("certificate was rejected") != std::string::npos);
    CHECK(!resp.error().retryable);

    auto cli = proc::run({bin_dir() + "/flotilla", "device", "list", "--hub", hub.url(), "--token-file",
                          (hub.data_dir() / "admin.token").string()},
                         std::chrono::seconds(30));
    REQUIRE(cli);
    INFO(cli->err);
    CHECK(cli->exit_code != 0);
    CHECK(cli->err.find("certificate") != std::string::npos);
    CHECK(cli->out.empty());
  }

  SECTION("the certificate must name the host the client asked for") {
    http::Request r;
    r.url = "https://localhost:" + port + "/readyz";  // the certificate only names 127.0.0.1
    r.ca_file = ca;
    r.timeout = std::chrono::seconds(5);
    auto resp = http::send(r);
    REQUIRE(!resp);
    INFO(resp.error().message);
    CHECK(resp.error().message.find("mismatch") != std::string::npos);
  }

  SECTION("a missing CA file is a clear error") {
    http::Request r;
    r.url = hub.url() + "/readyz";
    r.ca_file = (tmp.path() / "nope.pem").string();
    auto resp = http::send(r);
    REQUIRE(!resp);
    CHECK(resp.error().message.find("cannot read CA file") != std::string::npos);
  }
}

TEST_CASE("the hub refuses to start with half or a wrong TLS setup", "[integration][tls]") {
  TempDir tmp;
  make_pki(tmp.path());
  const std::string cert = (tmp.path() / "hub.pem").string();

  SECTION("--tls-cert without --tls-key") {
    auto r = run_hub_expecting_exit(tmp.path() / "hub", {"--tls-cert", cert});
    INFO(r.err);
    CHECK(r.exit_code == 2);
    CHECK(r.err.find("tls-key") != std::string::npos);
  }

  SECTION("a key that does not match the certificate") {
    auto r = run_hub_expecting_exit(tmp.path() / "hub",
                                    {"--tls-cert", cert, "--tls-key", (tmp.path() / "other.key").string()});
    INFO(r.err);
    CHECK(r.exit_code == 2);
    CHECK(r.err.find("does not match") != std::string::npos);
  }

  SECTION("an unreadable certificate file") {
    auto r = run_hub_expecting_exit(tmp.path() / "hub", {"--tls-cert", (tmp.path() / "missing.pem").string(),
                                                          "--tls-key", (tmp.path() / "hub.key").string()});
    INFO(r.err);
    CHECK(r.exit_code == 2);
    CHECK(r.err.find("cannot read") != std::string::npos);
  }
}
