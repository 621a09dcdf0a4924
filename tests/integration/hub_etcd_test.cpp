// [integration] Coordination on a real 3-member etcd 3.4 cluster on loopback
// (tests/support/etcd_cluster.hpp): the same contract the SQLite backend
// passes in the unit tier, failover between members, the explicit
// "etcd unreachable" mode with nothing half-written, and two hub ownership
// instances where the one that stops renewing loses its cells and its
// fenced writes.
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <string>

#include "flotilla/hub/coord.hpp"
#include "tests/support/coord_contract.hpp"
#include "tests/support/etcd_cluster.hpp"
#include "tests/support/pki.hpp"
#include "tests/support/temp_dir.hpp"

using namespace flotilla;
namespace co = flotilla::hub::coord;
namespace contract = flotilla::test::coord_contract;

namespace {

std::unique_ptr<co::Coordinator> connect(std::vector<std::string> endpoints) {
  co::EtcdOptions o;
  o.endpoints = std::move(endpoints);
  o.request_timeout = std::chrono::milliseconds(3000);
  o.connect_timeout = std::chrono::milliseconds(500);
  auto c = co::open_etcd_coordinator(o);
  REQUIRE(c.ok());
  return std::move(*c);
}

// Real time: poll until etcd has revoked the lease (its TTL passed).
void wait_expired(co::Coordinator& c, co::LeaseId id) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    auto t = c.lease_ttl(id);
    if (!t && t.error().code == Errc::not_found) return;
    REQUIRE((t.ok() || t.error().code == Errc::not_found));
    ::usleep(100 * 1000);
  }
  FAIL("lease " << id << " did not expire within 30s");
}

std::string value_of(co::Coordinator& c, const std::string& key) { return contract::value_of(c, key); }

}  // namespace

TEST_CASE("etcd: the coordination contract holds on a real 3-member cluster", "[integration][etcd]") {
  REQUIRE(test::EtcdCluster::available());
  test::TempDir tmp("etcd");
  test::EtcdCluster cluster(tmp.path(), 3);
  cluster.start();
  auto c = connect(cluster.client_urls());
  CHECK(c->backend() == "etcd");
  contract::run_all(*c, "/contract/", wait_expired);
}

TEST_CASE("etcd: one member down changes nothing, all down is 'etcd unreachable' with nothing half-written, "
          "back, work resumes",
          "[integration][etcd]") {
  REQUIRE(test::EtcdCluster::available());
  test::TempDir tmp("etcd");
  test::EtcdCluster cluster(tmp.path(), 3);
  cluster.start();
  auto c = connect(cluster.client_urls());
  auto lease = c->grant_lease(std::chrono::seconds(60));
  REQUIRE(lease.ok());
  auto r1 = c->put("/f/a", "1");
  REQUIRE(r1.ok());
  auto watch = c->watch("/f/", *r1);
  REQUIRE(watch.ok());
  REQUIRE(contract::collect(**watch, 1).size() == 1);

  // The first endpoint is the one in use: stop it. If it led, the others
  // elect a new leader first (about a second here); etcd's own clients see
  // that window too, so the test waits for it rather than racing it.
  cluster.stop_member(0);
  REQUIRE(cluster.wait_healthy(1, std::chrono::seconds(30)));
  auto r2 = c->compare_and_swap("/f/a", *r1, "2");
  REQUIRE(r2.ok());
  CHECK(value_of(*c, "/f/a") == "2");
  REQUIRE(c->create("/f/b", "x", lease->id).ok());
  REQUIRE(c->keep_alive(lease->id).ok());
  auto rng = c->range("/f/", 10);
  REQUIRE(rng.ok());
  CHECK(rng->kvs.size() == 2);
  // The watch moves to another member and misses nothing.
  auto evs = contract::collect(**watch, 2);
  REQUIRE(evs.size() == 2);
  CHECK(evs[0].kv.mod_revision == *r2);
  CHECK(evs[1].kv.key == "/f/b");

  // Every member down: a clear error naming etcd, for reads and writes.
  cluster.stop_all();
  auto txn = c->txn({co::Compare::absent("/f/c")}, {co::Op::put("/f/c", "half"), co::Op::put("/f/d", "half")});
  REQUIRE_FALSE(txn.ok());
  CHECK(txn.error().code == Errc::coordination_unavailable);
  CHECK(txn.error().message.find("etcd unreachable") != std::string::npos);
  auto get = c->get("/f/a");
  REQUIRE_FALSE(get.ok());
  CHECK(get.error().code == Errc::coordination_unavailable);
  auto ka = c->keep_alive(lease->id);
  REQUIRE_FALSE(ka.ok());
  CHECK(ka.error().code == Errc::coordination_unavailable);
  auto down = (*watch)->next(std::chrono::milliseconds(200));
  REQUIRE_FALSE(down.ok());
  CHECK(down.error().code == Errc::coordination_unavailable);

  // Back: the same client works, and the refused transaction left nothing.
  cluster.start_all();
  CHECK(value_of(*c, "/f/c") == "<absent>");
  CHECK(value_of(*c, "/f/d") == "<absent>");
  CHECK(value_of(*c, "/f/a") == "2");
  auto r3 = c->put("/f/e", "after");
  REQUIRE(r3.ok());
  CHECK(*r3 > *r2);
  // A watch resumed from where the old one stopped sees the new write once.
  auto resumed = c->watch("/f/", (*watch)->last_revision() + 1);
  REQUIRE(resumed.ok());
  auto tail = contract::collect(**resumed, 1);
  REQUIRE(tail.size() == 1);
  CHECK(tail[0].kv.key == "/f/e");
}

TEST_CASE("etcd: a hub that stops renewing loses its cells to the other within the TTL, and its fenced write is "
          "refused",
          "[integration][etcd]") {
  REQUIRE(test::EtcdCluster::available());
  test::TempDir tmp("etcd");
  test::EtcdCluster cluster(tmp.path(), 3);
  cluster.start();
  auto urls = cluster.client_urls();
  auto ca = connect(urls);
  std::reverse(urls.begin(), urls.end());  // the other hub talks to another member first
  auto cb = connect(urls);

  const auto ttl = std::chrono::seconds(2);
  co::CellOwnership a(*ca, "hub-a", ttl);
  co::CellOwnership b(*cb, "hub-b", ttl);
  REQUIRE(a.start().ok());
  REQUIRE(b.start().ok());
  const std::vector<std::string> cells = {"0", "1", "2", "3"};
  auto got_a = a.claim_unowned({"0", "1"});
  REQUIRE(got_a.ok());
  CHECK(got_a->size() == 2);
  auto got_b = b.claim_unowned(cells);
  REQUIRE(got_b.ok());
  CHECK(*got_b == std::vector<std::string>{"2", "3"});
  REQUIRE(a.guarded_put("0", "/cells/0/count", "a:10").ok());

  // a "dies": no more keep-alives. b keeps renewing and polls for free cells.
  REQUIRE(a.renew().ok());
  const auto last_renew = std::chrono::steady_clock::now();
  const auto deadline = last_renew + 10 * ttl;
  while (b.cells().size() < cells.size() && std::chrono::steady_clock::now() < deadline) {
    REQUIRE(b.tick().ok());
    REQUIRE(b.claim_unowned(cells).ok());
    ::usleep(100 * 1000);
  }
  REQUIRE(b.cells() == cells);
  const auto took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - last_renew);
  std::cout << "etcd takeover: cells taken " << took.count() << " ms after the last keep-alive (TTL "
            << ttl.count() * 1000 << " ms)" << std::endl;

  // a still believes it owns cell 0: etcd refuses its write.
  REQUIRE(a.fence("0").has_value());
  auto late = a.guarded_put("0", "/cells/0/count", "a:11");
  REQUIRE_FALSE(late.ok());
  CHECK(late.error().code == Errc::refused);
  CHECK(value_of(*cb, "/cells/0/count") == "a:10");
  REQUIRE(b.guarded_put("0", "/cells/0/count", "b:11").ok());
  CHECK(value_of(*ca, "/cells/0/count") == "b:11");
  auto owner = ca->get(co::CellOwnership::owner_key("0"));
  REQUIRE(owner.ok());
  CHECK((*owner)->value == "hub-b");
  // a notices on its next renewal, and can start over as a newcomer.
  auto renew = a.renew();
  REQUIRE_FALSE(renew.ok());
  CHECK(renew.error().code == Errc::refused);
  CHECK(a.cells().empty());
  REQUIRE(a.start().ok());
  auto none = a.claim_unowned(cells);
  REQUIRE(none.ok());
  CHECK(none->empty());
}

TEST_CASE("etcd: with no member reachable every call is 'etcd unreachable' naming every member", "[integration][etcd]") {
  // Port 1 on loopback: refused at once, no etcd needed.
  co::EtcdOptions o;
  o.endpoints = {"http://127.0.0.1:1", "http://127.0.0.1:2"};
  o.request_timeout = std::chrono::milliseconds(500);
  o.connect_timeout = std::chrono::milliseconds(500);
  auto c = co::open_etcd_coordinator(o);
  REQUIRE(c.ok());
  auto r = (*c)->create("/k", "v");
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == Errc::coordination_unavailable);
  CHECK(r.error().message.find("etcd unreachable") != std::string::npos);
  CHECK(r.error().message.find("127.0.0.1:2") != std::string::npos);  // every member tried
  auto l = (*c)->grant_lease(std::chrono::seconds(5));
  REQUIRE_FALSE(l.ok());
  CHECK(l.error().code == Errc::coordination_unavailable);
  auto w = (*c)->watch("/k", 0);
  REQUIRE_FALSE(w.ok());
  CHECK(w.error().code == Errc::coordination_unavailable);
}

// etcd run as docs/operations.md says to run it across machines: client
// TLS, and only clients with a certificate from etcd's CA. The whole
// contract (watches included) holds for a hub with its certificate; a
// client without one, with one from another CA, or not trusting the
// members' CA is refused with the cause named, and writes nothing.
TEST_CASE("etcd over TLS with client certificates: the contract holds for a hub with its certificate, and without one, "
          "with another CA's, or trusting another CA it is refused and writes nothing",
          "[integration][etcd]") {
  REQUIRE(test::EtcdCluster::available());
  test::TempDir tmp("etcd-tls");
  const auto pki = tmp.path() / "pki";
  std::filesystem::create_directories(pki);
  const auto f = [&](const std::string& name) { return (pki / name).string(); };
  test::make_ca(pki, "etcd-ca");
  test::make_cert(pki, "etcd-ca", "member", "serverAuth,clientAuth");
  test::make_cert(pki, "etcd-ca", "hub", "clientAuth");
  test::make_ca(pki, "other-ca");
  test::make_cert(pki, "other-ca", "stranger", "clientAuth");
  test::EtcdCluster cluster(tmp.path() / "etcd", 1, test::EtcdTls{f("etcd-ca.pem"), f("member.pem"), f("member.key")});
  cluster.start();
  REQUIRE(cluster.client_urls()[0].rfind("https://", 0) == 0);

  auto client = [&](const std::string& ca, const std::string& cert, const std::string& key) {
    co::EtcdOptions o;
    o.endpoints = cluster.client_urls();
    o.ca_file = ca;
    o.cert_file = cert;
    o.key_file = key;
    o.request_timeout = std::chrono::milliseconds(3000);
    o.connect_timeout = std::chrono::milliseconds(1000);
    auto c = co::open_etcd_coordinator(o);
    REQUIRE(c.ok());
    return std::move(*c);
  };
  auto hub = client(f("etcd-ca.pem"), f("hub.pem"), f("hub.key"));
  contract::run_all(*hub, "/contract/", wait_expired);

  struct Refused {
    const char* what;
    std::unique_ptr<co::Coordinator> c;
    const char* says;  // the cause, named
  };
  // etcd refuses the first two (an alert after the request was written: not
  // an "outcome unknown", the request never reached etcd). When etcd closes
  // before this hub has read its alert, the kernel answers with a reset and
  // the alert is lost: "Connection reset by peer". This hub refuses the
  // third (the member's certificate is not from the CA it trusts).
  const char* refused_by_etcd = "etcd refused this hub's TLS session";
  std::vector<Refused> refused;
  refused.push_back({"no client certificate", client(f("etcd-ca.pem"), "", ""), refused_by_etcd});
  refused.push_back({"a certificate from another CA", client(f("etcd-ca.pem"), f("stranger.pem"), f("stranger.key")),
                     refused_by_etcd});
  refused.push_back({"trusting another CA", client(f("other-ca.pem"), f("hub.pem"), f("hub.key")),
                     "TLS handshake: certificate verify failed"});
  for (auto& r : refused) {
    INFO(r.what);
    auto put = r.c->create("/tls/refused", r.what);
    REQUIRE_FALSE(put.ok());
    INFO(put.error().message);
    CHECK(put.error().code == Errc::coordination_unavailable);
    CHECK(put.error().message.find("etcd unreachable") != std::string::npos);
    const bool reset =
        r.says == refused_by_etcd && put.error().message.find("Connection reset by peer") != std::string::npos;
    CHECK((put.error().message.find(r.says) != std::string::npos || reset));
    // A reset can also come after the request was written; only then may it
    // say "outcome unknown" (nothing was written either way: checked below).
    if (!reset) CHECK(put.error().message.find("outcome is unknown") == std::string::npos);
    auto get = r.c->get("/contract/");
    REQUIRE_FALSE(get.ok());
    CHECK(get.error().code == Errc::coordination_unavailable);
  }
  // Plain HTTP to a member that speaks TLS is refused too.
  auto plain = connect({"http://" + cluster.client_urls()[0].substr(8)});
  CHECK_FALSE(plain->create("/tls/refused", "plain").ok());
  // None of them wrote anything; the hub's client still works.
  CHECK(value_of(*hub, "/tls/refused") == "<absent>");
  REQUIRE(hub->create("/tls/ok", "v").ok());
  CHECK(value_of(*hub, "/tls/ok") == "v");
}
