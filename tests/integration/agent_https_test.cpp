// The static agent's HTTPS client (Boost.Asio over the minimal OpenSSL it
// links, docs/adr/0007-minimal-openssl-for-the-agent.md) against the real hub
// serving TLS with RSA and ECDSA certificates. Without tls-ca-file the agent
// takes its trust from OpenSSL's default verify paths, which SSL_CERT_FILE
// points at the test CA (broker_tls_test covers tls-ca-file with P-256).
#include <catch2/catch.hpp>

#include <fstream>

#include "flotilla/bundles/keys.hpp"
#include "tests/support/harness.hpp"
#include "tests/support/pki.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

// A CA and a hub certificate for 127.0.0.1, both with the key newkey names
// ("rsa:2048", or "ec" with a curve); tests/support/pki.hpp makes P-256 only.
void make_pki(const stdfs::path& dir, const std::vector<std::string>& newkey) {
  const auto p = [&](const char* name) { return (dir / name).string(); };
  auto req = [&](std::vector<std::string> args) {
    std::vector<std::string> a = {"req"};
    a.insert(a.end(), newkey.begin(), newkey.end());
    a.insert(a.end(), args.begin(), args.end());
    run_openssl(a);
  };
  req({"-x509", "-nodes", "-keyout", p("ca.key"), "-out", p("ca.pem"), "-days", "2", "-subj", "/CN=flotilla test CA",
       "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"});
  std::ofstream(dir / "ext.cnf") << "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
  req({"-nodes", "-keyout", p("hub.key"), "-out", p("hub.csr"), "-subj", "/CN=flotilla hub"});
  run_openssl({"x509", "-req", "-in", p("hub.csr"), "-CA", p("ca.pem"), "-CAkey", p("ca.key"), "-CAcreateserial", "-out",
               p("hub.pem"), "-days", "2", "-extfile", p("ext.cnf")});
}

}  // namespace

TEST_CASE("the static agent enrolls over https with a hub whose certificate is RSA or ECDSA",
          "[integration][tls][agent]") {
  const auto [name, newkey] = GENERATE(table<std::string, std::vector<std::string>>({
      {"RSA 2048", {"-newkey", "rsa:2048"}},
      {"ECDSA P-256", {"-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"}},
      {"ECDSA P-384", {"-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp384r1"}},
  }));
  INFO("hub certificate: " << name);
  TempDir tmp;
  make_pki(tmp.path(), newkey);
  const std::string ca = (tmp.path() / "ca.pem").string();
  Hub hub(tmp.path() / "hub");
  hub.start({"--tls-cert", (tmp.path() / "hub.pem").string(), "--tls-key", (tmp.path() / "hub.key").string()}, ca);
  REQUIRE(hub.url().rfind("https://127.0.0.1:", 0) == 0);
  const auto release = bundles::generate_key();
  AgentOptions opts;
  opts.root_keys = {bundles::public_key_text(release.pub)};

  SECTION("trusting the hub's CA, it enrolls and comes online") {
    Agent agent(tmp.path() / "dev", hub.url(), hub.enrollment_token({{"env", "tls"}}), opts);
    agent.start_with_env({{"SSL_CERT_FILE", ca}});
    const bool online = wait_until(
        [&] { return !agent.device_id().empty() && hub.device(agent.device_id())["online"] == true; },
        std::chrono::seconds(60));
    INFO(agent.log());
    CHECK(online);
    CHECK(hub.devices().size() == 1);
  }

  SECTION("without the CA it refuses the hub's certificate and does not enroll") {
    Agent agent(tmp.path() / "dev", hub.url(), hub.enrollment_token({{"env", "tls"}}), opts);
    agent.start_with_env({{"SSL_CERT_FILE", (tmp.path() / "no-such-ca.pem").string()},
                          {"SSL_CERT_DIR", (tmp.path() / "no-such-dir").string()}});
    const bool refused =
        wait_until([&] { return agent.log().find("certificate was rejected") != std::string::npos; },
                   std::chrono::seconds(30));
    INFO(agent.log());
    CHECK(refused);
    CHECK(agent.device_id().empty());
    CHECK(hub.devices().empty());
  }
}
