#pragma once
// What the federation's unit tests (federation_store, federation_pages,
// federation_create) build: a federation front over a hub with no engine
// thread and no bundle source, stand-in regions' JSON answers, and the PKI a
// stand-in region serves HTTPS with.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "flotilla/common/clock.hpp"
#include "flotilla/hub/api.hpp"
#include "flotilla/hub/federation.hpp"
#include "flotilla/hub/http_server.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/hub/store.hpp"
#include "tests/support/hub_fixtures.hpp"
#include "tests/support/pki.hpp"

namespace flotilla::test {

// A stand-in region's answer: `body` as JSON with `status`.
inline hub::HttpResponse json_answer(int status, const nlohmann::json& body) {
  hub::HttpResponse r;
  r.status = status;
  r.content_type = "application/json";
  r.body = body.dump();
  return r;
}

// A CA and a server certificate "region" in `dir` for stand-in regions to
// serve HTTPS with; returns the CA's PEM, what a Region record carries.
inline std::string region_pki(const std::filesystem::path& dir) {
  make_ca(dir, "ca");
  make_server_cert(dir, "ca", "region");
  std::ifstream in(dir / "ca.pem");
  std::stringstream pem;
  pem << in.rdbuf();
  return pem.str();
}

// A stand-in region on loopback HTTPS with the certificate region_pki made.
inline std::unique_ptr<hub::HttpServer> serve_region(const std::filesystem::path& dir, hub::HttpServer::Handler handler,
                                                     int threads = 2) {
  hub::HttpServerConfig hc;
  hc.port = 0;
  hc.threads = threads;
  hc.tls_cert_file = (dir / "region.pem").string();
  hc.tls_key_file = (dir / "region.key").string();
  auto server = hub::HttpServer::start(hc, std::move(handler));
  REQUIRE(server);
  return std::move(*server);
}

inline std::unique_ptr<hub::Store> open_test_store(const std::filesystem::path& file) {
  auto s = hub::Store::open(file.string());
  REQUIRE(s);
  return std::move(*s);
}

inline std::unique_ptr<hub::federation::FederationStore> open_test_federation_store(const std::filesystem::path& file) {
  auto s = hub::federation::FederationStore::open(file.string());
  REQUIRE(s);
  return std::move(*s);
}

inline hub::ServiceConfig quiet_service_config() {
  hub::ServiceConfig sc;
  sc.engine_thread = false;
  sc.manage_broker_credentials = false;
  return sc;
}

// A federation role as the hub runs it, without regions: its own hub store
// and service (no engine thread, no broker credentials), a federation with
// no bundles to publish, the federation's API in front, and an admin token.
// Members are built in the order they are declared.
struct FederationFront {
  explicit FederationFront(const std::filesystem::path& dir)
      : store(open_test_store(dir / "hub.db")),
        fstore(open_test_federation_store(dir / "federation.db")),
        service(*store, clock, quiet_service_config()),
        fed(*fstore, clock, hub::federation::FederationConfig{},
            (std::filesystem::create_directories(dir / "region-ca"), dir / "region-ca"), [](hub::AuditRecord) {},
            [](const std::string&, const std::string&) -> Result<hub::BundleRecord> {
              return make_error(Errc::not_found, "no bundles here");
            },
            [](const std::string&) { return std::string(); }),
        api(service),
        front(fed, api, service),
        admin(make_token(service, "api", "root", "admin").secret) {}

  std::unique_ptr<hub::Store> store;
  std::unique_ptr<hub::federation::FederationStore> fstore;
  FakeClock clock;
  hub::HubService service;
  hub::federation::Federation fed;
  hub::Api api;
  hub::federation::FederationApi front;
  const std::string admin;
};

}  // namespace flotilla::test
