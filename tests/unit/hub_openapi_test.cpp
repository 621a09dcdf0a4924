// docs/api/openapi.yaml against the server: every route the hub has is
// documented with that method and nothing else is, public routes are marked
// public, and the hub serves the file byte for byte. (Its validity as
// OpenAPI 3 is checked by openapi-spec-validator, a ctest of its own.)
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <string>

#include "flotilla/common/clock.hpp"
#include "flotilla/hub/api.hpp"
#include "flotilla/hub/federation.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/hub/store.hpp"

namespace {

using RouteSet = std::set<std::pair<std::string, std::string>>;

std::string openapi_path() { return std::string(FLOTILLA_SOURCE_DIR) + "/docs/api/openapi.yaml"; }

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

std::string upper(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

const std::set<std::string> kMethods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"};

struct ServerFixture {
  ServerFixture() {
    std::random_device rd;
    dir = std::filesystem::temp_directory_path() / ("flotilla-openapi-test-" + std::to_string(rd()));
    std::filesystem::create_directories(dir);
    auto s = flotilla::hub::Store::open((dir / "hub.db").string());
    REQUIRE(s);
    store = std::move(*s);
    service = std::make_unique<flotilla::hub::HubService>(*store, clock, flotilla::hub::ServiceConfig{});
    api = std::make_unique<flotilla::hub::Api>(*service);
  }
  ~ServerFixture() {
    api.reset();
    service.reset();
    store.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  std::filesystem::path dir;
  flotilla::FakeClock clock;
  std::unique_ptr<flotilla::hub::Store> store;
  std::unique_ptr<flotilla::hub::HubService> service;
  std::unique_ptr<flotilla::hub::Api> api;
};

}  // namespace

TEST_CASE("hub OpenAPI document lists exactly the routes the server has", "[unit][hub][openapi]") {
  ServerFixture f;
  const YAML::Node doc = YAML::LoadFile(openapi_path());
  REQUIRE(doc["openapi"].as<std::string>().rfind("3.", 0) == 0);
  REQUIRE(doc["paths"].IsMap());

  RouteSet documented, public_documented, federation_only;
  for (const auto& path : doc["paths"]) {
    // Paths only a federation serves (docs/adr/0015) are checked below.
    const bool fed_only = path.second["x-flotilla-role"] &&
                          path.second["x-flotilla-role"].as<std::string>() == "federation";
    for (const auto& op : path.second) {
      const auto method = op.first.as<std::string>();
      if (!kMethods.count(method)) continue;  // parameters, summary, ...
      const auto key = std::make_pair(upper(method), path.first.as<std::string>());
      if (fed_only) {
        federation_only.insert(key);
        continue;
      }
      documented.insert(key);
      const auto sec = op.second["security"];
      if (sec && sec.IsSequence() && sec.size() == 0) public_documented.insert(key);
    }
  }
  RouteSet served;
  for (const auto& r : f.api->routes()) served.insert(r);

  for (const auto& r : served) {
    INFO("served but not documented: " << r.first << " " << r.second);
    CHECK(documented.count(r));
  }
  for (const auto& r : documented) {
    INFO("documented but not served: " << r.first << " " << r.second);
    CHECK(served.count(r));
  }

  // A federation answers its own routes (and the hub's for the rest): those
  // no hub has are documented as federation-only, and only those.
  RouteSet federation_served;
  for (const auto& r : flotilla::hub::federation::federation_routes()) {
    if (!served.count(r)) federation_served.insert(r);
  }
  CHECK(federation_served == federation_only);

  // Routes that need no token say so (security: []) and only those: a request
  // without a token to any other route is 401.
  for (const auto& [method, pattern] : served) {
    std::string path = pattern;
    for (auto open = path.find('{'); open != std::string::npos; open = path.find('{')) {
      path.replace(open, path.find('}', open) - open + 1, std::string(64, 'a'));
    }
    flotilla::hub::HttpRequest req;
    req.method = method;
    req.target = path;
    const auto resp = f.api->handle(req);
    INFO(method << " " << pattern << " -> " << resp.status);
    CHECK((resp.status == 401) == !public_documented.count({method, pattern}));
  }
}

TEST_CASE("hub serves the OpenAPI document it was built with", "[unit][hub][openapi]") {
  ServerFixture f;
  flotilla::hub::HttpRequest req;
  req.method = "GET";
  req.target = "/v1/openapi.yaml";
  const auto resp = f.api->handle(req);  // no token: the description is public
  REQUIRE(resp.status == 200);
  CHECK(resp.content_type == "application/yaml");
  CHECK(resp.body == read_file(openapi_path()));
}

// The hub refuses a query parameter a route does not take, naming those it
// takes (rest::only_params); they are the ones the document lists, and every
// route with a token documents that 400.
TEST_CASE("hub OpenAPI lists each route's query parameters as the server takes them, and its 400",
          "[unit][hub][openapi]") {
  ServerFixture f;
  flotilla::hub::TokenRecord rec;
  rec.name = "root";
  rec.role = "admin";
  rec.project = "*";
  auto admin = f.service->create_token("api", rec);
  REQUIRE(admin);
  const YAML::Node doc = YAML::LoadFile(openapi_path());
  const YAML::Node shared = doc["components"]["parameters"];
  auto query_params = [&](const YAML::Node& list, std::set<std::string>& out) {
    if (!list.IsDefined()) return;
    for (const auto& entry : list) {
      // A copy, never an assignment: assigning a yaml-cpp node writes through to the document.
      const YAML::Node p =
          entry["$ref"] ? shared[entry["$ref"].as<std::string>().substr(std::string("#/components/parameters/").size())]
                        : entry;
      REQUIRE(p.IsDefined());
      if (p["in"].as<std::string>() == "query") out.insert(p["name"].as<std::string>());
    }
  };
  int checked = 0;
  for (const auto& path : doc["paths"]) {
    if (path.second["x-flotilla-role"]) continue;  // a federation's own routes take none
    for (const auto& op : path.second) {
      const auto method = op.first.as<std::string>();
      if (!kMethods.count(method)) continue;
      const auto sec = op.second["security"];
      if (sec && sec.IsSequence() && sec.size() == 0) continue;  // public: no token, no query read
      const std::string pattern = path.first.as<std::string>();
      INFO(upper(method) << " " << pattern);
      CHECK(op.second["responses"]["400"].IsDefined());
      std::set<std::string> documented;
      query_params(path.second["parameters"], documented);
      query_params(op.second["parameters"], documented);

      std::string target = pattern;
      for (auto open = target.find('{'); open != std::string::npos; open = target.find('{')) {
        target.replace(open, target.find('}', open) - open + 1, std::string(64, 'a'));
      }
      flotilla::hub::HttpRequest req;
      req.method = upper(method);
      req.target = target + "?zz-not-a-parameter=1";
      req.headers["authorization"] = "Bearer " + admin->secret;
      const auto resp = f.api->handle(req);
      INFO(resp.body);
      REQUIRE(resp.status == 400);
      const std::string msg = nlohmann::json::parse(resp.body)["error"]["message"].get<std::string>();
      const std::string lead = "; it takes ";
      REQUIRE(msg.find(lead) != std::string::npos);
      std::set<std::string> taken;
      std::istringstream rest(msg.substr(msg.find(lead) + lead.size()));
      for (std::string name; std::getline(rest, name, ',');) {
        name.erase(0, name.find_first_not_of(' '));
        if (name != "none") taken.insert(name);
      }
      CHECK(taken == documented);
      ++checked;
    }
  }
  CHECK(checked > 40);
}
