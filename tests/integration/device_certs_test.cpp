// Broker authentication by per-device certificates (issue 16), with the real
// hub, its embedded mosquitto and real certificates: the broker takes the
// device CA's certificates and nothing else, the ACL confines each
// certificate to its device's topics (checked with mosquitto_sub and
// mosquitto_pub, not our own client), another CA's, an expired and a revoked
// certificate are refused at connect, enrollments never touch the broker,
// and renewal keeps a device connected across its certificate's expiry.
#include <catch2/catch.hpp>

#include <signal.h>

#include <fstream>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/http_client.hpp"
#include "flotilla/common/x509.hpp"
#include "flotilla/hub/broker.hpp"
#include "flotilla/hub/device_ca.hpp"
#include "flotilla/hub/http_server.hpp"
#include "flotilla/v1/enroll.pb.h"
#include "flotilla/v1/report.pb.h"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

const std::vector<std::string> kNoLimits = {"--enroll-rate", "0", "--enroll-rate-per-token", "0",
                                            "--http-max-connections-per-peer", "0"};

// A certificate and key as files, for mosquitto's own clients.
struct CertFiles {
  std::string cert, key;
};

// mosquitto_sub / mosquitto_pub against the hub's broker with a client
// certificate; returns the tool's exit code and output.
proc::RunResult mosquitto_tool(Hub& hub, const std::string& tool, const CertFiles& id,
                               const std::vector<std::string>& args) {
  const std::string port = fs::read_file(hub.data_dir() / "broker/port", 64).value();
  std::vector<std::string> argv = {"/usr/bin/" + tool, "-h", "127.0.0.1", "-p", port, "--cafile",
                                   hub.broker_ca_file(), "--cert", id.cert, "--key", id.key, "-q", "1"};
  argv.insert(argv.end(), args.begin(), args.end());
  auto r = proc::run(argv, std::chrono::seconds(20));
  REQUIRE(r);
  return *r;
}

size_t count_of(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

CertFiles agent_files(const test::Agent& a) {
  const auto tls = a.root() / "var/lib/flotilla/tls";
  return {(tls / "client.pem").string(), (tls / "client.key").string()};
}

// Connects once with mosquitto_sub and returns its exit code: 0 when it got
// one message, 27 when it connected and waited in vain, anything else when
// the broker refused the connection.
int sub_exit(Hub& hub, const CertFiles& id, const std::string& topic, int wait_s) {
  return mosquitto_tool(hub, "mosquitto_sub", id, {"-t", topic, "-C", "1", "-W", std::to_string(wait_s)}).exit_code;
}

struct Enrolled {
  int status = 0;
  std::string body;
  v1::EnrollResponse resp;
};

Enrolled enroll_by_hand(Hub& hub, const std::string& token, const bundles::KeyPair& key) {
  v1::EnrollRequest req;
  req.set_enrollment_token(token);
  req.set_device_public_key(std::string(key.pub.key.begin(), key.pub.key.end()));
  req.set_hostname("cert-test");
  req.set_arch("amd64");
  const auto issued = static_cast<uint64_t>(SystemClock::instance().now_unix_ms());
  req.set_issued_unix_ms(issued);
  const Bytes proof = bundles::sign_detached(key, bundles::enroll_proof_message(token, key.pub.key, issued));
  req.set_proof(std::string(proof.begin(), proof.end()));
  req.set_csr(device_csr(key));
  http::Request r;
  r.method = "POST";
  r.url = hub.url() + "/v1/enroll";
  r.body = req.SerializeAsString();
  r.headers["Content-Type"] = "application/x-protobuf";
  auto resp = http::send(r);
  REQUIRE(resp);
  Enrolled e;
  e.status = resp->status;
  e.body = resp->body;
  if (e.status == 200) REQUIRE(e.resp.ParseFromString(resp->body));
  return e;
}

CertFiles write_pair(const stdfs::path& dir, const std::string& name, const std::string& cert_pem,
                     const std::string& key_pem) {
  stdfs::create_directories(dir);
  CertFiles f{(dir / (name + ".pem")).string(), (dir / (name + ".key")).string()};
  REQUIRE(fs::write_file_atomic(f.cert, cert_pem, 0600));
  REQUIRE(fs::write_file_atomic(f.key, key_pem, 0600));
  return f;
}

// Two devices enrolled by hand at the hub, each with its certificate and key as files in dir.
struct TwoDevices {
  bundles::KeyPair ka, kb;
  Enrolled ea, eb;
  std::string aid, bid;
  CertFiles a, b;
};
TwoDevices enroll_two(Hub& hub, const stdfs::path& dir) {
  const std::string token = hub.enrollment_token({{"env", "it"}}, 4);
  TwoDevices t{bundles::generate_key(), bundles::generate_key(), {}, {}, {}, {}, {}, {}};
  t.ea = enroll_by_hand(hub, token, t.ka);
  t.eb = enroll_by_hand(hub, token, t.kb);
  REQUIRE(t.ea.status == 200);
  REQUIRE(t.eb.status == 200);
  t.aid = t.ea.resp.device_id();
  t.bid = t.eb.resp.device_id();
  t.a = write_pair(dir, "a", t.ea.resp.client_certificate(), x509::ed25519_private_key_pem(t.ka.secret));
  t.b = write_pair(dir, "b", t.eb.resp.client_certificate(), x509::ed25519_private_key_pem(t.kb.secret));
  return t;
}

// sha256 of every file mosquitto reads (config, ACL, TLS files), and the
// password file if there is one: what "no configuration write" means.
std::map<std::string, std::string> broker_files(Hub& hub) {
  return snapshot(hub.data_dir() / "broker", {"state", "mosquitto.log", "mosquitto.pid"});
}

}  // namespace

TEST_CASE("a device's certificate opens only its own topics, checked with mosquitto_sub and mosquitto_pub",
          "[integration][security][certs]") {
  Fleet fleet(2);
  auto& a = *fleet.agents[0];
  auto& b = *fleet.agents[1];
  // Both desired states are retained on the broker once a campaign ran.
  auto bundle = make_bundle("edge-base", 1, {}, {&fleet.release});
  REQUIRE(run_campaign(fleet.hub, fleet.push(bundle), "env=it")["counts"]["applied"] == 2);
  const std::string aid = a.device_id(), bid = b.device_id();
  // The enrollment answer carried a certificate for the device's own key, CN = its id, and no password.
  auto info = x509::parse_certificate_pem(fs::read_file(agent_files(a).cert).value());
  REQUIRE(info);
  CHECK(info->subject_cn == aid);
  CHECK(a.mqtt_password().empty());
  CHECK_FALSE(stdfs::exists(fleet.hub.data_dir() / "broker/passwd"));

  // A's agent steps aside: the broker names the session after the certificate.
  a.stop();
  const CertFiles as_a = agent_files(a);
  // A reads its own retained desired state...
  CHECK(sub_exit(fleet.hub, as_a, transport::device_topic(aid, "desired"), 5) == 0);
  // ...but not B's, nor anyone's through a wildcard: connected, and nothing arrives.
  CHECK(sub_exit(fleet.hub, as_a, transport::device_topic(bid, "desired"), 3) == 27);
  CHECK(sub_exit(fleet.hub, as_a, "flotilla/v1/d/" + bid + "/#", 3) == 27);

  // A writing B's report: the broker drops it; the hub never sees it.
  const json b_before = fleet.hub.device(bid);
  const std::string report_count = "flotilla_mqtt_messages_received_total{kind=\"report\"}";
  const double reports_before = metric(metrics_text(fleet.hub), report_count);
  REQUIRE(reports_before >= 0);
  v1::Report fake;
  fake.set_device_id(bid);
  fake.set_seq(UINT64_MAX - 1);
  fake.set_state(v1::AGENT_STATE_FAILED);
  fake.mutable_error()->set_reason(v1::REASON_INTERNAL);
  fake.mutable_error()->set_message("forged by A");
  const auto fake_file = fleet.tmp.path() / "fake.pb";
  REQUIRE(fs::write_file_atomic(fake_file, fake.SerializeAsString(), 0600));
  auto pub = mosquitto_tool(fleet.hub, "mosquitto_pub", as_a,
                            {"-t", transport::device_topic(bid, "report"), "-f", fake_file.string()});
  INFO(pub.err);
  CHECK(pub.exit_code == 0);  // mosquitto acknowledges and withholds what the ACL denies
  // A report A may send, right after: once the hub has it, the forged one had its chance.
  v1::Report mine;
  mine.set_device_id(aid);
  mine.set_seq(UINT64_MAX - 1);
  mine.set_state(v1::AGENT_STATE_IDLE);
  const auto mine_file = fleet.tmp.path() / "mine.pb";
  REQUIRE(fs::write_file_atomic(mine_file, mine.SerializeAsString(), 0600));
  pub = mosquitto_tool(fleet.hub, "mosquitto_pub", as_a,
                       {"-t", transport::device_topic(aid, "report"), "-f", mine_file.string()});
  CHECK(pub.exit_code == 0);
  // Exactly one report reached the hub: A's own (the forged one went first).
  REQUIRE(wait_until([&] { return metric(metrics_text(fleet.hub), report_count) >= reports_before + 1; },
                     std::chrono::seconds(20)));
  CHECK(metric(metrics_text(fleet.hub), report_count) == reports_before + 1);
  const json b_after = fleet.hub.device(bid);
  CHECK(b_after["last_message"] != "forged by A");
  CHECK(b_after["state"] == b_before["state"]);

  // No certificate at all: the handshake fails.
  const std::string port = fs::read_file(fleet.hub.data_dir() / "broker/port", 64).value();
  auto anon = proc::run({"/usr/bin/mosquitto_sub", "-h", "127.0.0.1", "-p", port, "--cafile",
                         fleet.hub.broker_ca_file(), "-t", "#", "-C", "1", "-W", "2"},
                        std::chrono::seconds(20));
  REQUIRE(anon);
  CHECK(anon->exit_code != 0);
  CHECK(anon->exit_code != 27);
}

TEST_CASE("another CA's, an expired and a revoked certificate are refused at connect",
          "[integration][security][certs]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  const auto dir = tmp.path() / "certs";
  const TwoDevices two = enroll_two(hub, dir);
  const auto& [ka, kb, ea, eb, aid, bid, good_a, good_b] = two;
  // The certificates work at once, with nothing reloaded.
  CHECK(sub_exit(hub, good_a, transport::device_topic(aid, "desired"), 1) == 27);
  CHECK(sub_exit(hub, good_b, transport::device_topic(bid, "desired"), 1) == 27);

  SECTION("a certificate from another CA, for the same name") {
    auto other = hub::DeviceCa::ephemeral(SystemClock::instance().now_unix());
    REQUIRE(other);
    auto c = (*other)->issue_client(aid, SystemClock::instance().now_unix(), 3600);
    REQUIRE(c);
    const CertFiles forged = write_pair(dir, "other-ca", c->pem, c->key_pem);
    CHECK(sub_exit(hub, forged, transport::device_topic(aid, "desired"), 1) != 27);
    CHECK(sub_exit(hub, forged, transport::device_topic(aid, "desired"), 1) != 0);
    // Our own client says why: the broker refused the certificate.
    auto t = transport::make_paho_transport();
    transport::ConnectOptions co;
    co.url = hub.broker_url();
    co.client_id = aid;
    co.ca_file = hub.broker_ca_file();
    co.cert_file = forged.cert;
    co.key_file = forged.key;
    co.timeout = std::chrono::seconds(5);
    auto s = t->connect(co);
    REQUIRE_FALSE(s);
    INFO(s.error().message);
    CHECK(s.error().code == Errc::unauthenticated);
  }

  SECTION("an expired certificate from the hub's own CA") {
    hub::DeviceCaConfig cfg;
    cfg.dir = hub.data_dir() / "ca";
    auto ca = hub::DeviceCa::open(cfg, SystemClock::instance().now_unix());
    REQUIRE(ca);
    // Issued two hours ago for one hour.
    auto c = (*ca)->issue_client(aid, SystemClock::instance().now_unix() - 7200, 3600);
    REQUIRE(c);
    REQUIRE(c->not_after_unix < SystemClock::instance().now_unix());
    const CertFiles expired = write_pair(dir, "expired", c->pem, c->key_pem);
    const int code = sub_exit(hub, expired, transport::device_topic(aid, "desired"), 1);
    CHECK(code != 27);
    CHECK(code != 0);
    // The same CA's current certificate for the same name still works: it is the date that was refused.
    auto fresh = (*ca)->issue_client(aid, SystemClock::instance().now_unix(), 3600);
    REQUIRE(fresh);
    CHECK(sub_exit(hub, write_pair(dir, "fresh", fresh->pem, fresh->key_pem), transport::device_topic(aid, "desired"),
                   1) == 27);
  }

  SECTION("a revoked certificate: the device was decommissioned") {
    const double reloads_before = metric(metrics_text(hub), "flotilla_broker_reloads_total");
    auto r = hub.cli({"device", "decommission", bid, "--yes"});
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    // The revocation list is the one change that reloads the broker.
    CHECK(metric(metrics_text(hub), "flotilla_broker_reloads_total") > reloads_before);
    const int code = sub_exit(hub, good_b, transport::device_topic(bid, "desired"), 1);
    CHECK(code != 27);
    CHECK(code != 0);
    auto t = transport::make_paho_transport();
    transport::ConnectOptions co = hub.device_session(kb, eb.resp, dir / "paho");
    co.timeout = std::chrono::seconds(5);
    auto s = t->connect(co);
    REQUIRE_FALSE(s);
    INFO(s.error().message);
    CHECK(s.error().code == Errc::unauthenticated);
    CHECK(s.error().message.find("revoked") != std::string::npos);
    // A is untouched, and the list the hub publishes names B's serial.
    CHECK(sub_exit(hub, good_a, transport::device_topic(aid, "desired"), 1) == 27);
    http::Request get;
    get.url = hub.url() + "/v1/device-ca/crl";
    auto crl = http::send(get);
    REQUIRE(crl);
    CHECK(crl->status == 200);
    CHECK(crl->body.find("-----BEGIN X509 CRL-----") != std::string::npos);
    // Renewal is refused too, with the device's own valid proof.
    v1::RenewRequest rr;
    rr.set_device_id(bid);
    rr.set_csr(device_csr(kb));
    rr.set_issued_unix_ms(static_cast<uint64_t>(SystemClock::instance().now_unix_ms()));
    const Bytes proof = bundles::sign_detached(kb, bundles::renew_proof_message(bid, rr.csr(), rr.issued_unix_ms()));
    rr.set_proof(std::string(proof.begin(), proof.end()));
    http::Request post;
    post.method = "POST";
    post.url = hub.url() + "/v1/renew";
    post.body = rr.SerializeAsString();
    post.headers["Content-Type"] = "application/x-protobuf";
    auto renewed = http::send(post);
    REQUIRE(renewed);
    CHECK(renewed->status == 403);
  }
}

TEST_CASE("1,000 enrollments send mosquitto no SIGHUP and change none of its files",
          "[integration][certs][scale]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start(kNoLimits);
  const std::string token = hub.enrollment_token({{"env", "it"}}, 1000);
  const auto before = broker_files(hub);
  REQUIRE(before.count("mosquitto.conf") == 1);
  const std::string pid_before = fs::read_file(hub.data_dir() / "broker/mosquitto.pid", 64).value();
  const double reloads_before = metric(metrics_text(hub), "flotilla_broker_reloads_total");
  REQUIRE(reloads_before == 0);

  bundles::KeyPair last;
  Enrolled last_enrolled;
  for (int i = 0; i < 1000; ++i) {
    last = bundles::generate_key();
    last_enrolled = enroll_by_hand(hub, token, last);
    INFO("enrollment " << i << ": " << last_enrolled.body);
    REQUIRE(last_enrolled.status == 200);
    REQUIRE_FALSE(last_enrolled.resp.client_certificate().empty());
    REQUIRE(last_enrolled.resp.mqtt_password().empty());
  }
  const std::string text = metrics_text(hub);
  CHECK(metric(text, "flotilla_broker_reloads_total") == 0);
  CHECK(metric(text, "flotilla_device_certificates_issued_total{at=\"enroll\"}") == 1000);
  // Not one byte of what mosquitto reads changed, and it is the same process.
  CHECK(broker_files(hub) == before);
  CHECK(fs::read_file(hub.data_dir() / "broker/mosquitto.pid", 64).value() == pid_before);
  // The last device connects on its first attempt.
  auto t = transport::make_paho_transport();
  auto co = hub.device_session(last, last_enrolled.resp, tmp.path() / "last");
  CHECK(t->connect(co));
  t->disconnect();

  // The counter would have seen reloads: in the development mode each
  // password enrollment reloads the broker.
  TempDir tmp2;
  Hub dev(tmp2.path() / "hub");
  dev.start({"--dev-plain-mqtt", "true"});
  CHECK(dev.log().find("DEVELOPMENT MODE (dev-plain-mqtt)") != std::string::npos);
  const std::string dev_token = dev.enrollment_token({{"env", "it"}}, 1);
  auto e = enroll_by_hand(dev, dev_token, bundles::generate_key());
  REQUIRE(e.status == 200);
  CHECK_FALSE(e.resp.mqtt_password().empty());
  CHECK(e.resp.client_certificate().empty());
  CHECK(metric(metrics_text(dev), "flotilla_broker_reloads_total") >= 1);
}

TEST_CASE("renewal keeps a device connected across its certificate's expiry, offline or not",
          "[integration][certs][renewal]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start({"--device-cert-lifetime", "12s"});
  AgentOptions o;
  o.root_keys = {bundles::public_key_text(bundles::generate_key().pub)};
  auto agent = std::make_unique<test::Agent>(tmp.path() / "dev", hub.url(), hub.enrollment_token({{"env", "it"}}, 1), o);
  agent->start();
  const bool online = wait_until([&] {
    try {
      return hub.device(agent->device_id())["online"] == true;
    } catch (const std::exception&) {
      return false;
    }
  }, std::chrono::seconds(60));
  INFO("agent log:\n" << agent->log() << "\nhub log:\n" << hub.log());
  REQUIRE(online);
  const std::string id = agent->device_id();
  auto serial_now = [&] {
    auto pem = fs::read_file(agent_files(*agent).cert);
    if (!pem) return std::string();
    auto info = x509::parse_certificate_pem(*pem);
    return info ? info->serial_hex : std::string();
  };
  const std::string first = serial_now();
  REQUIRE_FALSE(first.empty());
  const auto first_info = x509::parse_certificate_pem(fs::read_file(agent_files(*agent).cert).value());
  REQUIRE(first_info);

  // Connected: the agent renews before two thirds of the lifetime.
  REQUIRE(wait_until([&] { return serial_now() != first && !serial_now().empty(); }, std::chrono::seconds(30)));
  INFO(agent->log());
  // The agent writes the certificate first and logs the renewal after it:
  // the line may not be there yet the moment the file changes.
  CHECK(wait_until([&] { return agent->log().find("renewed the broker certificate") != std::string::npos; },
                   std::chrono::seconds(10)));
  // Past the first certificate's end the device is still online, and when
  // mosquitto dies (the hub's watchdog restarts it on the same port, every
  // session reconnects) it is back at once with its renewed certificate.
  REQUIRE(wait_until([&] { return SystemClock::instance().now_unix() > first_info->not_after_unix + 1; },
                     std::chrono::seconds(30)));
  CHECK(hub.device(id)["online"] == true);
  CHECK(metric(metrics_text(hub), "flotilla_device_certificates_issued_total{at=\"renew\"}") >= 1);
  const auto pid_file = hub.data_dir() / "broker/mosquitto.pid";
  const std::string old_pid = fs::read_file(pid_file, 64).value();
  const auto reconnects = [&] { return count_of(agent->log(), "connected device="); };
  const size_t before_restart = reconnects();
  REQUIRE(::kill(static_cast<pid_t>(std::stol(old_pid)), SIGKILL) == 0);
  REQUIRE(wait_until([&] { return fs::read_file(pid_file, 64).value_or(old_pid) != old_pid; },
                     std::chrono::seconds(20)));
  CHECK(wait_until([&] { return reconnects() > before_restart && hub.device(id)["online"] == true; },
                   std::chrono::seconds(60)));

  // Offline past expiry: the broker refuses the expired certificate, the
  // agent renews with a fresh proof of its identity key and reconnects.
  agent->stop();
  const std::string held = serial_now();
  auto held_info = x509::parse_certificate_pem(fs::read_file(agent_files(*agent).cert).value());
  REQUIRE(held_info);
  REQUIRE(wait_until([&] { return SystemClock::instance().now_unix() > held_info->not_after_unix + 1; },
                     std::chrono::seconds(30)));
  CHECK(sub_exit(hub, agent_files(*agent), transport::device_topic(id, "desired"), 1) != 27);
  agent->start();
  const bool back = wait_until([&] { return hub.device(id)["online"] == true && serial_now() != held; },
                               std::chrono::seconds(60));
  INFO("agent log after the restart:\n" << agent->log() << "\nhub log:\n" << hub.log());
  CHECK(back);
  CHECK(hub.device(id)["state"] != "decommissioned");
}

namespace {

struct Renewed {
  int status = 0;
  std::string body;
  v1::RenewResponse resp;
};

// POST /v1/renew as an agent does: a fresh request for the identity key,
// signed with it.
Renewed renew_by_hand(Hub& hub, const bundles::KeyPair& key) {
  v1::RenewRequest rr;
  rr.set_device_id(bundles::device_id_for_key(key.pub.key));
  rr.set_csr(device_csr(key));
  rr.set_issued_unix_ms(static_cast<uint64_t>(SystemClock::instance().now_unix_ms()));
  const Bytes proof =
      bundles::sign_detached(key, bundles::renew_proof_message(rr.device_id(), rr.csr(), rr.issued_unix_ms()));
  rr.set_proof(std::string(proof.begin(), proof.end()));
  http::Request post;
  post.method = "POST";
  post.url = hub.url() + "/v1/renew";
  post.body = rr.SerializeAsString();
  post.headers["Content-Type"] = "application/x-protobuf";
  auto resp = http::send(post);
  REQUIRE(resp);
  Renewed r;
  r.status = resp->status;
  r.body = resp->body;
  if (r.status == 200) REQUIRE(r.resp.ParseFromString(resp->body));
  return r;
}

std::string broker_file(Hub& hub, const std::string& name) {
  return fs::read_file(hub.data_dir() / "broker" / name, 64).value_or("");
}

// mosquitto_pub with a user name and password on a plain-MQTT port: what
// a device of an older agent does. Returns the tool's exit code.
int publish_with_password(const std::string& port, const std::string& user, const std::string& password,
                          const std::string& topic, const std::string& file) {
  auto r = proc::run({"/usr/bin/mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-i", user, "-u", user, "-P", password,
                      "-q", "1", "-t", topic, "-f", file},
                     std::chrono::seconds(20));
  REQUIRE(r);
  return r->exit_code;
}

// Points an agent at a hub that came back on another REST port.
void set_hub_url(const test::Agent& a, const std::string& url) {
  const auto file = a.root() / "etc/flotilla/agent.yaml";
  std::string yaml = fs::read_file(file).value();
  const auto at = yaml.find("hub-url: ");
  REQUIRE(at != std::string::npos);
  yaml.replace(at, yaml.find('\n', at) - at, "hub-url: " + url);
  REQUIRE(fs::write_file_atomic(file, yaml, 0644));
}

bool online(Hub& hub, const std::string& id) {
  try {
    return hub.device(id)["online"] == true;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

// docs/operations.md "Moving devices from passwords to certificates", step by step.
TEST_CASE("devices enrolled with passwords keep working on TLS until they renew, then move to certificates",
          "[integration][certs][migration]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start({"--dev-plain-mqtt", "true"});
  const std::string token = hub.enrollment_token({{"env", "it"}}, 2);
  // A: an agent of this version. B: an older agent, played by hand (it keeps its password).
  AgentOptions o;
  o.root_keys = {bundles::public_key_text(bundles::generate_key().pub)};
  auto a = std::make_unique<test::Agent>(tmp.path() / "dev-a", hub.url(), token, o);
  a->start();
  REQUIRE(wait_until([&] { return !a->device_id().empty() && online(hub, a->device_id()); },
                     std::chrono::seconds(60)));
  const std::string aid = a->device_id();
  const std::string a_password = a->mqtt_password();
  REQUIRE_FALSE(a_password.empty());
  CHECK_FALSE(stdfs::exists(agent_files(*a).cert));
  const auto kb = bundles::generate_key();
  auto eb = enroll_by_hand(hub, token, kb);
  REQUIRE(eb.status == 200);
  const std::string bid = eb.resp.device_id();
  const std::string b_password = eb.resp.mqtt_password();
  REQUIRE_FALSE(b_password.empty());
  CHECK(eb.resp.client_certificate().empty());
  const std::string old_port = broker_file(hub, "port");
  REQUIRE_FALSE(old_port.empty());
  CHECK(eb.resp.broker_url() == "tcp://127.0.0.1:" + old_port);

  // The hub restarts without the development flag: certificates, TLS.
  a->stop();
  hub.stop();
  size_t mark = hub.log().size();  // the log file goes on across restarts
  hub.start();
  const std::string cert_port = broker_file(hub, "port");
  CHECK(broker_file(hub, "legacy-port") == old_port);
  CHECK(cert_port != old_port);
  CHECK(stdfs::exists(hub.data_dir() / "broker/passwd"));
  CHECK(hub.log().substr(mark).find("2 devices enrolled with passwords still connect to tcp://127.0.0.1:" +
                                    old_port) != std::string::npos);

  // B keeps working with its password, on the port it knows: its report reaches the hub.
  const std::string report_count = "flotilla_mqtt_messages_received_total{kind=\"report\"}";
  const double reports_before = std::max(0.0, metric(metrics_text(hub), report_count));
  v1::Report rep;
  rep.set_device_id(bid);
  rep.set_seq(1);
  rep.set_state(v1::AGENT_STATE_IDLE);
  const auto rep_file = tmp.path() / "b-report.pb";
  REQUIRE(fs::write_file_atomic(rep_file, rep.SerializeAsString(), 0600));
  CHECK(publish_with_password(old_port, bid, b_password, transport::device_topic(bid, "report"), rep_file.string()) ==
        0);
  CHECK(wait_until([&] { return metric(metrics_text(hub), report_count) >= reports_before + 1; },
                   std::chrono::seconds(20)));
  // A password opens nothing on the certificate listener.
  CHECK(publish_with_password(cert_port, bid, b_password, transport::device_topic(bid, "report"),
                              rep_file.string()) != 0);

  // A, an agent of this version with a password, renews at once: it gets a
  // certificate and the certificate listener's URL, and its password goes
  // (one reload).
  const double reloads_before = metric(metrics_text(hub), "flotilla_broker_reloads_total");
  set_hub_url(*a, hub.url());
  a->start();
  const bool moved = wait_until(
      [&] {
        return stdfs::exists(agent_files(*a).cert) && a->mqtt_password().empty() && online(hub, aid) &&
               a->log().find("renewed the broker certificate") != std::string::npos;
      },
      std::chrono::seconds(60));
  INFO("agent log:\n" << a->log() << "\nhub log:\n" << hub.log());
  REQUIRE(moved);
  auto a_cert = x509::parse_certificate_pem(fs::read_file(agent_files(*a).cert).value());
  REQUIRE(a_cert);
  CHECK(a_cert->subject_cn == aid);
  CHECK(hub.log().find("renewed device=" + aid) != std::string::npos);
  CHECK(hub.log().find("(moved from a password)") != std::string::npos);
  CHECK(metric(metrics_text(hub), "flotilla_broker_reloads_total") == reloads_before + 1);
  // On the certificate listener, and its old password no longer opens the password one.
  CHECK(sub_exit(hub, agent_files(*a), transport::device_topic(aid, "desired"), 1) == 27);
  CHECK(publish_with_password(old_port, aid, a_password, transport::device_topic(aid, "report"), rep_file.string()) !=
        0);
  // B, which has not renewed, is untouched.
  CHECK(publish_with_password(old_port, bid, b_password, transport::device_topic(bid, "report"), rep_file.string()) ==
        0);

  // B renews (an upgraded agent would): a certificate and the certificate listener's URL.
  auto rb = renew_by_hand(hub, kb);
  INFO(rb.body);
  REQUIRE(rb.status == 200);
  CHECK(rb.resp.broker_url() == "ssl://127.0.0.1:" + cert_port);
  CHECK(x509::count_certificates(rb.resp.ca_certificates()) == 1);
  const CertFiles b_files = write_pair(tmp.path() / "b", "b", rb.resp.client_certificate(),
                                       x509::ed25519_private_key_pem(kb.secret));
  CHECK(sub_exit(hub, b_files, transport::device_topic(bid, "desired"), 1) == 27);
  CHECK(publish_with_password(old_port, bid, b_password, transport::device_topic(bid, "report"), rep_file.string()) !=
        0);
  CHECK(metric(metrics_text(hub), "flotilla_broker_reloads_total") == reloads_before + 2);

  // No password left: the next start has no password listener and no password file.
  a->stop();
  hub.stop();
  mark = hub.log().size();
  hub.start();
  CHECK_FALSE(stdfs::exists(hub.data_dir() / "broker/legacy-port"));
  CHECK_FALSE(stdfs::exists(hub.data_dir() / "broker/passwd"));
  CHECK(broker_file(hub, "port") == cert_port);
  CHECK(hub.log().substr(mark).find("enrolled with passwords") == std::string::npos);
  CHECK(sub_exit(hub, b_files, transport::device_topic(bid, "desired"), 1) == 27);
  const std::string conf = fs::read_file(hub.data_dir() / "broker/mosquitto.conf").value();
  CHECK(conf.find("password_file") == std::string::npos);
  CHECK(conf.find("listener " + old_port) == std::string::npos);
  // A comes back on its certificate, with no new enrollment.
  set_hub_url(*a, hub.url());
  a->start();
  CHECK(wait_until([&] { return online(hub, aid); }, std::chrono::seconds(60)));
  CHECK(count_of(a->log(), "enrolled device=") == 1);
}

// docs/operations.md "Rotating the device CA", step by step, with real mosquitto.
TEST_CASE("a device CA rotation keeps old certificates working through the overlap and refuses them after",
          "[integration][certs][rotation]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  const auto ca_dir = hub.data_dir() / "ca";
  const std::string old_ca = fs::read_file(ca_dir / "device-ca.pem").value();
  const std::string token = hub.enrollment_token({{"env", "it"}}, 4);
  const auto ka = bundles::generate_key(), kb = bundles::generate_key(), kc = bundles::generate_key();
  auto ea = enroll_by_hand(hub, token, ka);
  REQUIRE(ea.status == 200);
  const std::string aid = ea.resp.device_id();
  const auto dir = tmp.path() / "certs";
  const CertFiles a_old = write_pair(dir, "a-old", ea.resp.client_certificate(),
                                     x509::ed25519_private_key_pem(ka.secret));
  CHECK(x509::verify_certificate(ea.resp.client_certificate(), old_ca));

  // Step 1: the new CA beside the current one, as next-ca (trusted, not issuing).
  hub::DeviceCaConfig next_cfg;
  next_cfg.dir = tmp.path() / "new-ca";
  auto next = hub::DeviceCa::open(next_cfg, SystemClock::instance().now_unix());
  REQUIRE(next);
  const std::string new_ca = fs::read_file(next_cfg.dir / "device-ca.pem").value();
  REQUIRE(fs::write_file_atomic(ca_dir / "next-ca.pem", new_ca, 0644));
  REQUIRE(fs::write_file_atomic(ca_dir / "next-ca.key", fs::read_file(next_cfg.dir / "device-ca.key").value(), 0600));
  hub.stop();
  hub.start();
  CHECK(x509::count_certificates(fs::read_file(hub.broker_ca_file()).value()) == 2);
  {
    http::Request get;
    get.url = hub.url() + "/v1/device-ca";
    auto r = http::send(get);
    REQUIRE(r);
    CHECK(x509::count_certificates(r->body) == 2);
  }
  CHECK(sub_exit(hub, a_old, transport::device_topic(aid, "desired"), 1) == 27);
  // Brokers already take the next CA's certificates...
  auto early = (*next)->issue_client("d-rotation-early", SystemClock::instance().now_unix(), 3600);
  REQUIRE(early);
  CHECK(sub_exit(hub, write_pair(dir, "early", early->pem, early->key_pem),
                 transport::device_topic("d-rotation-early", "desired"), 1) == 27);
  // ...but the current one still issues, and the answer names both CAs.
  auto eb = enroll_by_hand(hub, token, kb);
  REQUIRE(eb.status == 200);
  const std::string bid = eb.resp.device_id();
  CHECK(x509::verify_certificate(eb.resp.client_certificate(), old_ca));
  CHECK_FALSE(x509::verify_certificate(eb.resp.client_certificate(), new_ca));
  CHECK(x509::count_certificates(eb.resp.ca_certificates()) == 2);
  const CertFiles b_old = write_pair(dir, "b-old", eb.resp.client_certificate(),
                                     x509::ed25519_private_key_pem(kb.secret));

  // Step 2: the new CA issues; the old one is previous-ca, still trusted.
  hub.stop();
  for (const char* ext : {".pem", ".key"}) {
    stdfs::rename(ca_dir / (std::string("device-ca") + ext), ca_dir / (std::string("previous-ca") + ext));
    stdfs::rename(ca_dir / (std::string("next-ca") + ext), ca_dir / (std::string("device-ca") + ext));
  }
  hub.start();
  CHECK(sub_exit(hub, a_old, transport::device_topic(aid, "desired"), 1) == 27);
  CHECK(sub_exit(hub, b_old, transport::device_topic(bid, "desired"), 1) == 27);
  auto ec = enroll_by_hand(hub, token, kc);
  REQUIRE(ec.status == 200);
  const std::string cid = ec.resp.device_id();
  CHECK(x509::verify_certificate(ec.resp.client_certificate(), new_ca));
  CHECK_FALSE(x509::verify_certificate(ec.resp.client_certificate(), old_ca));
  const CertFiles c_new = write_pair(dir, "c-new", ec.resp.client_certificate(),
                                     x509::ed25519_private_key_pem(kc.secret));
  CHECK(sub_exit(hub, c_new, transport::device_topic(cid, "desired"), 1) == 27);
  // A renews during the overlap and moves to the new CA.
  auto ra = renew_by_hand(hub, ka);
  INFO(ra.body);
  REQUIRE(ra.status == 200);
  CHECK(x509::verify_certificate(ra.resp.client_certificate(), new_ca));
  CHECK_FALSE(x509::verify_certificate(ra.resp.client_certificate(), old_ca));
  const CertFiles a_new = write_pair(dir, "a-new", ra.resp.client_certificate(),
                                     x509::ed25519_private_key_pem(ka.secret));
  CHECK(sub_exit(hub, a_new, transport::device_topic(aid, "desired"), 1) == 27);
  // Revocation covers the old CA's certificates too (one CRL per CA).
  auto r = hub.cli({"device", "decommission", bid, "--yes"});
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  const int b_code = sub_exit(hub, b_old, transport::device_topic(bid, "desired"), 1);
  CHECK(b_code != 27);
  CHECK(b_code != 0);
  CHECK(sub_exit(hub, a_old, transport::device_topic(aid, "desired"), 1) == 27);

  // Step 3: the old CA retired. Its certificates are refused at connect; the new CA's work.
  hub.stop();
  stdfs::remove(ca_dir / "previous-ca.pem");
  stdfs::remove(ca_dir / "previous-ca.key");
  hub.start();
  CHECK(x509::count_certificates(fs::read_file(hub.broker_ca_file()).value()) == 1);
  const int a_code = sub_exit(hub, a_old, transport::device_topic(aid, "desired"), 1);
  CHECK(a_code != 27);
  CHECK(a_code != 0);
  CHECK(sub_exit(hub, a_new, transport::device_topic(aid, "desired"), 1) == 27);
  CHECK(sub_exit(hub, c_new, transport::device_topic(cid, "desired"), 1) == 27);
  // Paho says why: the broker refused the certificate.
  auto t = transport::make_paho_transport();
  transport::ConnectOptions co = hub.device_session(ka, ea.resp, dir / "paho");
  co.timeout = std::chrono::seconds(5);
  auto s = t->connect(co);
  REQUIRE_FALSE(s);
  INFO(s.error().message);
  CHECK(s.error().code == Errc::unauthenticated);
}

// A cell broker the hub does not run (several hub processes, docs/operations.md)
// gets the hub's revocations from `flotilla cell crl-sync` on a timer: a
// device decommissioned at the hub is refused there after one sync. Lists
// the broker must not take (another CA's, expired, older than the one it
// has) are refused and change nothing: the same file, no signal.
TEST_CASE("an external broker's revocation list follows the hub through flotilla cell crl-sync, and a list it must "
          "not take changes nothing",
          "[integration][security][certs]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  const TwoDevices two = enroll_two(hub, tmp.path() / "certs");
  const std::string &aid = two.aid, &bid = two.bid;
  const CertFiles &good_a = two.a, &good_b = two.b;

  // The external broker, as an operator runs one: the device CA's
  // certificates only, its revocation list from the start.
  const int64_t now = SystemClock::instance().now_unix();
  hub::DeviceCaConfig dcc;
  dcc.dir = hub.data_dir() / "ca";
  auto ca = hub::DeviceCa::open(dcc, now);
  REQUIRE(ca);
  const std::string device_ca = (tmp.path() / "device-ca.pem").string();
  REQUIRE(fs::write_file_atomic(device_ca, (*ca)->trust_pem(), 0644));
  hub::BrokerConfig bc;
  bc.dir = tmp.path() / "cell-broker";
  auto port = hub::free_listen_port();
  REQUIRE(port);
  bc.port = *port;
  bc.auth = hub::BrokerAuth::certificate;
  bc.client_ca_pem = (*ca)->trust_pem();
  auto first_crl = (*ca)->crl_pem({}, now - 60, 86400);
  REQUIRE(first_crl);
  bc.crl_pem = *first_crl;
  auto server = (*ca)->issue_server({"127.0.0.1"}, now, 86400);
  REQUIRE(server);
  bc.server_cert_pem = server->pem;
  bc.server_key_pem = server->key_pem;
  auto broker = hub::EmbeddedBroker::start(bc, {});
  REQUIRE(broker);
  const auto crl_file = bc.dir / "tls/crl.pem";
  const auto pid_file = bc.dir / "mosquitto.pid";
  REQUIRE(stdfs::exists(crl_file));
  auto at_cell_broker = [&](const CertFiles& id, const std::string& device) {
    auto r = proc::run({"/usr/bin/mosquitto_sub", "-h", "127.0.0.1", "-p", std::to_string(*port), "--cafile",
                        device_ca, "--cert", id.cert, "--key", id.key, "-q", "1", "-t",
                        transport::device_topic(device, "desired"), "-C", "1", "-W", "1"},
                       std::chrono::seconds(20));
    REQUIRE(r);
    return r->exit_code;  // 27: connected and waited; anything else: refused
  };
  auto sync = [&](const std::string& hub_url) {
    return proc::run({bin_dir() + "/flotilla", "cell", "crl-sync", "--hub", hub_url, "--out", crl_file.string(),
                      "--device-ca", device_ca, "--reload-pid-file", pid_file.string()},
                     std::chrono::seconds(60))
        .value();
  };
  CHECK(at_cell_broker(good_b, bid) == 27);

  // Decommissioned at the hub: its own broker refuses B at once, the cell
  // broker only once its list is synced.
  REQUIRE(hub.cli({"device", "decommission", bid, "--yes"}).exit_code == 0);
  CHECK(at_cell_broker(good_b, bid) == 27);
  auto synced = sync(hub.url());
  INFO(synced.out << synced.err);
  REQUIRE(synced.exit_code == 0);
  CHECK(synced.out.find("wrote " + crl_file.string()) != std::string::npos);
  CHECK(synced.out.find("sent SIGHUP to pid") != std::string::npos);
  CHECK(wait_until([&] { return at_cell_broker(good_b, bid) != 27; }, std::chrono::seconds(10)));
  CHECK(at_cell_broker(good_b, bid) != 0);
  CHECK(at_cell_broker(good_a, aid) == 27);  // A is untouched
  // Nothing new: nothing written, no signal.
  const auto installed = fs::read_file(crl_file).value();
  const auto written_at = stdfs::last_write_time(crl_file);
  auto again = sync(hub.url());
  CHECK(again.exit_code == 0);
  CHECK(again.out.find("unchanged") != std::string::npos);
  CHECK(again.out.find("SIGHUP") == std::string::npos);
  CHECK(stdfs::last_write_time(crl_file) == written_at);

  // A stand-in hub serving lists the broker must not take.
  auto other = hub::DeviceCa::ephemeral(now);
  REQUIRE(other);
  std::string served;
  hub::HttpServerConfig hc;
  hc.port = 0;
  hc.threads = 1;
  auto standin = hub::HttpServer::start(hc, [&](const hub::HttpRequest&) {
    hub::HttpResponse r;
    r.status = 200;
    r.content_type = "application/pkix-crl";
    r.body = served;
    return r;
  });
  REQUIRE(standin);
  const std::string standin_url = "http://127.0.0.1:" + std::to_string((*standin)->port());
  struct Bad {
    const char* what;
    std::string crl;
    const char* says;
  };
  const std::vector<Bad> bad = {
      {"another CA's list", (*other)->crl_pem({}, now, 86400).value(), "refused the hub's revocation list"},
      {"an expired list", (*ca)->crl_pem({}, now - 3 * 86400, 86400).value(), "expired at"},
      {"an older list, without B (a replay)", *first_crl, "before the one installed"},
  };
  for (const auto& b : bad) {
    INFO(b.what);
    served = b.crl;
    auto r = sync(standin_url);
    INFO(r.out << r.err);
    CHECK(r.exit_code == 1);
    CHECK(r.err.find(b.says) != std::string::npos);
    CHECK(r.err.find(crl_file.string() + " unchanged") != std::string::npos);
    CHECK(fs::read_file(crl_file).value() == installed);
    CHECK(stdfs::last_write_time(crl_file) == written_at);
  }
  CHECK(at_cell_broker(good_b, bid) != 27);  // still refused
  (*standin)->stop();
}
