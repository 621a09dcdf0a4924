// Gateway identities with the real hub and its mosquitto: a gateway may use
// exactly the topics of the devices enrolled behind it. The broker's ACL
// confines it to its own subtree; the hub drops what a gateway says about a
// device that is not behind it; enrollment behind a gateway needs the
// gateway's signature.
#include <catch2/catch.hpp>

#include <mutex>
#include <set>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/v1/enroll.pb.h"
#include "flotilla/v1/report.pb.h"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

struct Enrolled {
  int status = 0;
  v1::EnrollResponse resp;
  std::string body;
};

Enrolled enroll(Hub& hub, const std::string& token, const bundles::KeyPair& key, const std::string& gateway_id = "",
                const bundles::KeyPair* gateway_key = nullptr) {
  v1::EnrollRequest req;
  req.set_enrollment_token(token);
  req.set_device_public_key(std::string(key.pub.key.begin(), key.pub.key.end()));
  req.set_hostname("acl-test");
  req.set_arch("amd64");
  const std::string msg = bundles::enroll_proof_message(token, key.pub.key);
  const Bytes proof = bundles::sign_detached(key, msg);
  req.set_proof(std::string(proof.begin(), proof.end()));
  if (!gateway_id.empty()) {
    req.set_gateway_id(gateway_id);
    const Bytes gp = bundles::sign_detached(*gateway_key, msg);
    req.set_gateway_proof(std::string(gp.begin(), gp.end()));
  } else {
    // A gateway has its own broker session: a certificate for its key.
    req.set_csr(device_csr(key));
  }
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
  if (resp->status == 200) REQUIRE(e.resp.ParseFromString(resp->body));
  return e;
}

std::unique_ptr<transport::Transport> session(Hub& hub, const v1::EnrollResponse& creds, const bundles::KeyPair& key) {
  auto t = transport::make_paho_transport();
  transport::ConnectOptions co = hub.device_session(key, creds, hub.data_dir().parent_path() / "client-tls");
  co.clean_session = transport::ConnectOptions{}.clean_session;
  // The certificate works at once: enrolling changed nothing in the broker.
  Status st = t->connect(co);
  REQUIRE(st);
  return t;
}

std::string report(const std::string& device_id, v1::AgentState state, uint64_t seq) {
  v1::Report r;
  r.set_device_id(device_id);
  r.set_seq(seq);
  r.set_state(state);
  return r.SerializeAsString();
}

}  // namespace

TEST_CASE("a gateway may use exactly its own devices' topics", "[integration][sim][security]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  const std::string token = hub.enrollment_token({{"env", "acl"}});
  const auto gw_a_key = bundles::generate_key(), gw_b_key = bundles::generate_key();
  const auto dev_x_key = bundles::generate_key(), dev_y_key = bundles::generate_key();
  auto gw_a = enroll(hub, token, gw_a_key);
  auto gw_b = enroll(hub, token, gw_b_key);
  REQUIRE(gw_a.status == 200);
  REQUIRE(gw_b.status == 200);
  const std::string a = gw_a.resp.device_id(), b = gw_b.resp.device_id();

  // X behind A, Y behind B: no broker credential of their own, topics under the gateway.
  auto x = enroll(hub, token, dev_x_key, a, &gw_a_key);
  auto y = enroll(hub, token, dev_y_key, b, &gw_b_key);
  REQUIRE(x.status == 200);
  REQUIRE(y.status == 200);
  const std::string xid = x.resp.device_id(), yid = y.resp.device_id();
  CHECK(x.resp.mqtt_password().empty());
  CHECK(x.resp.client_certificate().empty());
  CHECK_FALSE(gw_a.resp.client_certificate().empty());
  CHECK(x.resp.topic_prefix() == "flotilla/v1/g/" + a + "/d/" + xid);
  CHECK(hub.device(xid)["id"] == xid);

  SECTION("enrollment behind a gateway needs the gateway's own signature") {
    const auto z_key = bundles::generate_key();
    auto forged = enroll(hub, token, z_key, a, &gw_b_key);  // signed by B, claims A
    CHECK(forged.status == 403);
    CHECK(forged.body.find("gateway proof does not verify") != std::string::npos);
    auto nested = enroll(hub, token, z_key, xid, &dev_x_key);  // a gatewayed device is no gateway
    CHECK(nested.status == 403);
    auto [st, body] = hub.call("GET", "/v1/devices");
    CHECK(body.dump().find(z_key.pub.key_id) == std::string::npos);
    CHECK(body["items"].size() == 4);  // A, B, X, Y: nothing was added
  }

  SECTION("the broker delivers A the desired state of its own devices only") {
    // mosquitto acknowledges every SUBSCRIBE and filters at delivery
    // (docs/security.md), so A asks for far more than it may have.
    auto ta = session(hub, gw_a.resp, gw_a_key);
    auto tb = session(hub, gw_b.resp, gw_b_key);
    std::mutex mu;
    std::set<std::string> got_a, got_b;
    ta->on_message([&](transport::Message&& m) {
      std::lock_guard lock(mu);
      got_a.insert(m.topic);
    });
    tb->on_message([&](transport::Message&& m) {
      std::lock_guard lock(mu);
      got_b.insert(m.topic);
    });
    for (const std::string& f : {transport::gateway_prefix(a) + "+/desired", transport::gateway_prefix(b) + "+/desired",
                                transport::device_topic(b, "desired"), std::string("flotilla/v1/g/#"),
                                std::string("flotilla/v1/d/+/desired")}) {
      REQUIRE(ta->subscribe(f, 1));
    }
    REQUIRE(tb->subscribe(transport::gateway_prefix(b) + "+/desired", 1));
    bundles::KeyPair release = bundles::generate_key();
    auto bundle = make_bundle("acl", 1, {std::make_tuple(v1::FILE_KIND_K3S_CONFIG, std::string("50-acl.yaml"),
                                                        std::string("node-label: [acl=1]\n"))},
                              {&release});
    auto [bs, bb] = hub.call("POST", "/v1/bundles", bundle.bytes, "application/octet-stream");
    REQUIRE(bs == 201);
    auto [cs, cb] = hub.call("POST", "/v1/campaigns", json{{"bundle", bb["id"]}, {"selector", "env=acl"}}.dump());
    REQUIRE(cs == 201);
    const std::string x_desired = transport::device_topic(xid, a, "desired");
    const std::string y_desired = transport::device_topic(yid, b, "desired");
    auto has = [&](const std::set<std::string>& s, const std::string& t) {
      std::lock_guard lock(mu);
      return s.count(t) > 0;
    };
    REQUIRE(wait_until([&] { return has(got_a, x_desired) && has(got_b, y_desired); }, std::chrono::seconds(20)));
    // Anything else A got would show up by now; give it a moment to be sure.
    wait_until([&] { std::lock_guard lock(mu); return got_a.size() > 2; }, std::chrono::milliseconds(1000));
    std::lock_guard lock(mu);
    CHECK_FALSE(got_a.count(y_desired));
    CHECK_FALSE(got_a.count(transport::device_topic(b, "desired")));
    for (const auto& t : got_a) {
      INFO(t);
      // Its own subtree, or its own desired state as a device.
      CHECK((t.rfind(transport::gateway_prefix(a), 0) == 0 || t == transport::device_topic(a, "desired")));
    }
  }

  SECTION("reports count only from the device's own gateway") {
    auto ta = session(hub, gw_a.resp, gw_a_key);
    auto tb = session(hub, gw_b.resp, gw_b_key);
    // A speaks for X on its own subtree: the hub takes it.
    REQUIRE(ta->publish({transport::device_topic(xid, a, "report"), report(xid, v1::AGENT_STATE_APPLIED, 10), 1, false}));
    REQUIRE(wait_until([&] { return hub.device(xid)["state"] == "applied"; }, std::chrono::seconds(10)));
    // B on its own subtree, about X (not behind B): the ACL lets it through, the hub drops it.
    REQUIRE(tb->publish({transport::device_topic(xid, b, "report"), report(xid, v1::AGENT_STATE_FAILED, 20), 1, false}));
    // A on B's subtree, about Y: the broker drops it (MQTT 3.1.1 has no refusal for a publish).
    REQUIRE(ta->publish({transport::device_topic(yid, b, "report"), report(yid, v1::AGENT_STATE_FAILED, 30), 1, false}));
    // A on Y's direct topic: dropped by the broker too.
    REQUIRE(ta->publish({transport::device_topic(yid, "report"), report(yid, v1::AGENT_STATE_FAILED, 40), 1, false}));
    // A marker after them, so the hub has seen everything before we look.
    REQUIRE(ta->publish({transport::device_topic(xid, a, "report"), report(xid, v1::AGENT_STATE_IDLE, 50), 1, false}));
    REQUIRE(wait_until([&] { return hub.device(xid)["state"] == "idle"; }, std::chrono::seconds(10)));
    CHECK(hub.device(yid)["state"] == "enrolled");
    CHECK(hub.log().find("dropped report of device=" + xid + " sent on the topics of gateway '" + b + "'") !=
          std::string::npos);
  }

  SECTION("a gateway's report batch counts only for the devices behind it") {
    const auto w_key = bundles::generate_key();
    auto w = enroll(hub, token, w_key, a, &gw_a_key);  // a second device behind A
    REQUIRE(w.status == 200);
    const std::string wid = w.resp.device_id();
    auto ta = session(hub, gw_a.resp, gw_a_key);
    auto tb = session(hub, gw_b.resp, gw_b_key);
    auto batch = [](std::initializer_list<std::tuple<std::string, v1::AgentState, uint64_t>> items) {
      v1::GatewayReports rs;
      for (const auto& [id, state, seq] : items) {
        auto* r = rs.add_reports();
        r->set_device_id(id);
        r->set_seq(seq);
        r->set_state(state);
      }
      return rs.SerializeAsString();
    };
    // Garbage, and a batch over the limit, are dropped whole: nothing in them counts.
    REQUIRE(ta->publish({transport::gateway_reports_topic(a), std::string("\xff\xff\xff not protobuf"), 1, false}));
    v1::GatewayReports big;
    for (int i = 0; i < 1001; ++i) {
      auto* r = big.add_reports();
      r->set_device_id(xid);
      r->set_seq(100 + static_cast<uint64_t>(i));
      r->set_state(v1::AGENT_STATE_FAILED);
    }
    REQUIRE(ta->publish({transport::gateway_reports_topic(a), big.SerializeAsString(), 1, false}));
    // B's batch about X (not behind B): the ACL lets it through on B's topic, the hub drops it.
    REQUIRE(tb->publish({transport::gateway_reports_topic(b), batch({{xid, v1::AGENT_STATE_FAILED, 5}}), 1, false}));
    // A on B's batch topic, about Y: the broker drops it.
    REQUIRE(ta->publish({transport::gateway_reports_topic(b), batch({{yid, v1::AGENT_STATE_FAILED, 5}}), 1, false}));
    // A's batch: X twice in order, W, and Y (behind B), which is dropped alone.
    REQUIRE(ta->publish({transport::gateway_reports_topic(a),
                         batch({{xid, v1::AGENT_STATE_INSTALLING, 10},
                                {yid, v1::AGENT_STATE_FAILED, 10},
                                {wid, v1::AGENT_STATE_APPLIED, 3},
                                {xid, v1::AGENT_STATE_APPLIED, 11}}),
                         1, false}));
    REQUIRE(wait_until([&] { return hub.device(xid)["state"] == "applied" && hub.device(wid)["state"] == "applied"; },
                       std::chrono::seconds(10)));
    CHECK(hub.device(yid)["state"] == "enrolled");
    // B's session is not ordered with A's: wait for the hub to have judged it too.
    for (const std::string& line : {"dropped report batch of gateway=" + a,
                                    "dropped report of device=" + yid + " sent on the topics of gateway '" + a + "'",
                                    "dropped report of device=" + xid + " sent on the topics of gateway '" + b + "'"}) {
      INFO(line);
      CHECK(wait_until([&] { return hub.log().find(line) != std::string::npos; }, std::chrono::seconds(10)));
    }
    CHECK(hub.device(xid)["state"] == "applied");
    // The oversized batch's seq 100+ never counted: a newer single report at 12 still applies.
    REQUIRE(ta->publish({transport::device_topic(xid, a, "report"), report(xid, v1::AGENT_STATE_IDLE, 12), 1, false}));
    CHECK(wait_until([&] { return hub.device(xid)["state"] == "idle"; }, std::chrono::seconds(10)));
  }

  SECTION("when the gateway's session ends, its devices are offline") {
    auto ta = session(hub, gw_a.resp, gw_a_key);
    v1::Presence on;
    on.set_online(true);
    REQUIRE(ta->publish({transport::device_topic(xid, a, "presence"), on.SerializeAsString(), 1, true}));
    REQUIRE(ta->publish({transport::device_topic(a, "presence"), on.SerializeAsString(), 1, true}));
    REQUIRE(wait_until([&] { return hub.device(xid)["online"] == true; }, std::chrono::seconds(10)));
    REQUIRE(ta->publish({transport::device_topic(a, "presence"), v1::Presence().SerializeAsString(), 1, true}));
    CHECK(wait_until([&] { return hub.device(xid)["online"] == false; }, std::chrono::seconds(10)));
  }
}
