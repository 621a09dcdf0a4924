#pragma once
// What the tests of several hub processes sharing cells (multihub,
// multihub_drain) start before their hubs: a real etcd cluster on loopback,
// one device CA and one director key for every hub (docs/security.md), and
// one mosquitto per cell running on its own (as systemd would run it), with
// the hub's own broker configuration and certificate auth, so a cell's
// broker needs nothing but the device CA. `hub_args` are the flags every
// hub process gets.
#include <catch2/catch.hpp>

#include <array>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/hub/broker.hpp"
#include "flotilla/hub/device_ca.hpp"
#include "tests/support/etcd_cluster.hpp"
#include "tests/support/harness.hpp"

namespace flotilla::test {

struct SharedCells {
  // cell_files: every hub keeps each cell's device rows in a file of its own
  // (--cell-files, docs/adr/0018).
  SharedCells(const std::filesystem::path& dir, int cells, int etcd_members, bool cell_files = false)
      : cluster(dir / "etcd", etcd_members) {
    cluster.start();
    const int64_t now = SystemClock::instance().now_unix();
    hub::DeviceCaConfig dcc;
    dcc.dir = dir / "ca";
    auto ca = hub::DeviceCa::open(dcc, now);
    REQUIRE(ca);
    REQUIRE(bundles::write_private_key(dir / "director.key", bundles::generate_key()));
    hub_args = {"--coordination", "etcd", "--etcd-timeout", "2s", "--cell-lease-ttl", "4s",
                "--device-ca-cert", (dcc.dir / "device-ca.pem").string(), "--device-ca-key",
                (dcc.dir / "device-ca.key").string(), "--director-key", (dir / "director.key").string()};
    if (cell_files) {
      hub_args.push_back("--cell-files");
      hub_args.push_back("true");
    }
    for (const auto& u : cluster.client_urls()) {  // the flag repeats, one member each
      hub_args.push_back("--etcd-endpoints");
      hub_args.push_back(u);
    }
    auto crl = (*ca)->crl_pem({}, now, 86400);
    REQUIRE(crl);
    for (int i = 0; i < cells; ++i) {
      hub::BrokerConfig bc;
      bc.dir = dir / ("broker-" + std::to_string(i));
      auto port = hub::free_listen_port();
      REQUIRE(port);
      bc.port = *port;
      bc.auth = hub::BrokerAuth::certificate;
      bc.client_ca_pem = (*ca)->trust_pem();
      bc.crl_pem = *crl;
      auto cert = (*ca)->issue_server({"127.0.0.1", "localhost"}, now, 86400);
      REQUIRE(cert);
      bc.server_cert_pem = cert->pem;
      bc.server_key_pem = cert->key_pem;
      auto b = hub::EmbeddedBroker::start(bc, {});
      REQUIRE(b);
      hub_args.push_back("--cell-broker");
      hub_args.push_back((*b)->url());
      brokers.push_back(std::move(*b));
    }
  }

  // Cell ownership as each hub's /metrics says it: owner[cell] = index of
  // the hub that holds it, -1 for none, -2 for more than one.
  template <size_t N>
  static std::array<int, N> owners(const std::vector<Hub*>& hubs) {
    std::array<int, N> owner;
    owner.fill(-1);
    for (size_t h = 0; h < hubs.size(); ++h) {
      if (!hubs[h]) continue;
      const std::string m = metrics_text(*hubs[h]);
      for (size_t c = 0; c < N; ++c) {
        if (metric(m, "flotilla_cell_owned{cell=\"" + std::to_string(c) + "\"}") == 1) {
          owner[c] = owner[c] == -1 ? static_cast<int>(h) : -2;
        }
      }
    }
    return owner;
  }

  EtcdCluster cluster;
  std::vector<std::string> hub_args;
  std::vector<std::unique_ptr<hub::EmbeddedBroker>> brokers;
};

}  // namespace flotilla::test
