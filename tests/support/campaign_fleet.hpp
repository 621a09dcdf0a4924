#pragma once
// A hub service over a real SQLite store with a fake clock and a recording
// transport, with enrolled devices whose reports the test writes: what the
// campaign engine's unit tests drive.
#include <catch2/catch.hpp>

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/v1/desired.pb.h"
#include "tests/support/hub_test_support.hpp"
#include "tests/support/store_helpers.hpp"
#include "tests/support/temp_dir.hpp"

namespace flotilla::test {

using hub::CampaignView;
using hub::HubService;
using hub::ServiceConfig;
using hub::Store;
using hub::Strategy;
using hub::TokenRecord;
using nlohmann::json;

struct Fleet {
  TempDir dir;
  FakeClock clock;
  std::unique_ptr<Store> store;
  std::unique_ptr<HubService> hub;
  RecordingTransport broker;
  bundles::KeyPair key = bundles::generate_key();
  std::vector<std::string> devices;
  std::map<std::string, uint64_t> seq;
  std::set<std::string> director_keys;  // as enrollment answers named them

  int cells = 1;  // cells of the hub (each device is in one; its messages arrive there)
  // Each cell's device rows in cells/<n>/devices.db (ADR 18), from the next open().
  bool cell_files = false;
  std::vector<std::unique_ptr<Store>> files;
  // Changes the service's settings before it is made (then restart()).
  std::function<void(ServiceConfig&)> tune;

  explicit Fleet(int cell_count = 1) : cells(cell_count) { open(); }

  void open() {
    auto s = Store::open((dir.path() / "hub.db").string());
    REQUIRE(s);
    store = std::move(*s);
    ServiceConfig cfg;
    cfg.broker_url = "tcp://127.0.0.1:1";
    cfg.public_url = "http://hub.test";
    cfg.engine_thread = false;  // the test ticks, with its fake clock
    for (int i = 0; i < cells && cells > 1; ++i) cfg.cell_broker_urls.push_back("tcp://127.0.0.1:" + std::to_string(i + 1));
    if (tune) tune(cfg);
    files.clear();
    for (int i = 0; cell_files && i < cells; ++i) {
      files.push_back(open_cell_file(dir.path(), i));
      cfg.cell_files.push_back(files.back().get());
    }
    hub = std::make_unique<HubService>(*store, clock, cfg);
    for (int i = 0; i < cells; ++i) REQUIRE(hub->attach_transport(i, broker));
  }

  // A "restart": a new service over the same SQLite file.
  void restart() {
    hub->stop();
    hub.reset();
    files.clear();
    store.reset();
    open();
  }

  void enroll(int n, const std::map<std::string, std::string>& labels = {{"env", "prod"}}) {
    TokenRecord t;
    t.role = "enroll";
    t.labels = labels;
    auto tok = hub->create_token("enroll", t);
    REQUIRE(tok);
    for (int i = 0; i < n; ++i) {
      auto k = bundles::generate_key();
      v1::EnrollRequest req;
      req.set_enrollment_token(tok->secret);
      req.set_device_public_key(std::string(k.pub.key.begin(), k.pub.key.end()));
      auto proof = bundles::sign_detached(k, bundles::enroll_proof_message(tok->secret, k.pub.key));
      req.set_proof(std::string(proof.begin(), proof.end()));
      auto r = hub->enroll(req);
      REQUIRE(r);
      devices.push_back(r->device_id());
      director_keys.insert(r->director_public_key());
      presence(r->device_id(), true);
    }
  }

  int cell_of(const std::string& device) {
    auto d = store->get_device(device);
    REQUIRE(d);
    REQUIRE(*d);
    return (*d)->cell;
  }

  void deliver(const std::string& device, const std::string& leaf, const std::string& payload) {
    // On the broker of the device's cell: from another cell's it is dropped.
    const int cell = cells > 1 ? cell_of(device) : 0;
    hub->on_message(cell, {transport::device_topic(device, leaf.c_str()), payload, 1, false});
    hub->drain();
  }

  void presence(const std::string& device, bool online) {
    v1::Presence p;
    p.set_online(online);
    deliver(device, "presence", p.SerializeAsString());
  }

  // Every desired state the hub published, in order.
  std::vector<v1::DesiredState> sent() const {
    std::vector<v1::DesiredState> out;
    for (const auto& m : broker.published()) {
      v1::DesiredState ds;
      if (ds.ParseFromString(m.payload)) out.push_back(ds);
    }
    return out;
  }

  // What the last desired state sent to a device was.
  std::optional<v1::DesiredState> desired(const std::string& device) {
    std::optional<v1::DesiredState> last;
    for (const auto& d : sent()) if (d.device_id() == device) last = d;
    return last;
  }

  // One random thing a device does, chosen by kind (drawn by the caller):
  // 0 its presence flips at random, 1 it starts installing what it was
  // sent, 2 it finishes it (applied two times in three, else failed).
  // Returns false for any other kind, left to the caller.
  template <class Rng>
  bool random_event(const std::string& device, unsigned kind, Rng& rng) {
    switch (kind) {
      case 0: presence(device, rng() % 2 == 0); return true;
      case 1:
        if (desired(device)) report(device, v1::AGENT_STATE_INSTALLING);
        return true;
      case 2:
        if (desired(device)) report(device, rng() % 3 ? v1::AGENT_STATE_APPLIED : v1::AGENT_STATE_FAILED);
        return true;
      default: return false;
    }
  }

  void report(const std::string& device, v1::AgentState state, v1::Reason reason = v1::REASON_NONE) {
    auto ds = desired(device);
    REQUIRE(ds);
    v1::Report r;
    r.set_device_id(device);
    r.set_seq(++seq[device] + 1000);
    r.set_state(state);
    r.set_generation(ds->generation());
    r.set_campaign_id(ds->campaign_id());
    if (reason != v1::REASON_NONE) r.mutable_error()->set_reason(reason);
    deliver(device, "report", r.SerializeAsString());
  }

  std::string bundle(uint64_t version) {
    v1::BundleManifest m;
    m.set_format_version(1);
    m.set_name("edge-base");
    m.set_channel("stable");
    m.set_version(version);
    m.set_expires_unix(clock.now_unix() + 86400);
    auto env = bundles::wrap(m);
    REQUIRE(bundles::sign(env, key));
    auto up = hub->upload_bundle(bundles::serialize_envelope(env));
    REQUIRE(up);
    return up->first.id;
  }

  CampaignView view(const std::string& id) {
    auto v = hub->campaign_view(id, true);
    REQUIRE(v);
    REQUIRE(*v);
    return **v;
  }

  std::map<std::string, std::string> statuses(const std::string& id) {
    std::map<std::string, std::string> out;
    for (const auto& d : view(id).devices) out[d.device_id] = d.status;
    return out;
  }

  std::string create(const json& strategy, const std::string& bundle_id, const std::string& selector = "env=prod") {
    auto s = Strategy::from_json(strategy);
    REQUIRE(s);
    auto c = hub->create_campaign("", bundle_id, selector, *s, "*");
    REQUIRE(c);
    return c->id;
  }

  // Devices of the campaign currently released and waiting for an outcome.
  std::vector<std::string> in_flight(const std::string& id) {
    std::vector<std::string> out;
    for (const auto& d : view(id).devices) {
      if (d.status == "pending" || d.status == "in_progress") out.push_back(d.device_id);
    }
    return out;
  }
};


}  // namespace flotilla::test
