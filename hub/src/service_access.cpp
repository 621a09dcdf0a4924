// HubService: token listing and revocation, device labels and
// decommissioning, the audit log and the counters /metrics reads.
#include "flotilla/common/log.hpp"
#include "flotilla/hub/broker.hpp"
#include "flotilla/hub/device_ca.hpp"
#include "flotilla/hub/service.hpp"

namespace flotilla::hub {

Result<std::vector<TokenRecord>> HubService::list_tokens(const std::string& kind) {
  return read([&](Store& from) { return from.list_tokens(kind); });
}

Result<std::optional<TokenRecord>> HubService::get_token(const std::string& kind, const std::string& id) {
  return read([&](Store& from) { return from.get_token(kind, id); });
}

Status HubService::revoke_token(const std::string& kind, const std::string& id) {
  // authenticate() reads the row on every request, so the next call with
  // this token is refused: there is no cache to invalidate (on any hub).
  if (auto s = control_write([&]() -> Status {
        std::lock_guard lock(store_mu_);
        return store_.revoke_token(kind, id);
      });
      !s) {
    return s;
  }
  log::get("hub")->info("revoked {} token id={}", kind, id);
  return {};
}

Result<DeviceRecord> HubService::edit_device_labels(
    const std::string& id, const std::map<std::string, std::optional<std::string>>& changes) {
  for (const auto& [k, v] : changes) {
    if (!valid_label_key(k)) return make_error(Errc::invalid_argument, "bad label key '" + k + "'");
    if (v && !valid_label_value(*v)) return make_error(Errc::invalid_argument, "bad value for label '" + k + "'");
  }
  auto edited = control_write([&]() -> Result<DeviceRecord> {
    std::lock_guard lock(store_mu_);
    bool decommissioned = false;
    auto d = device_record(store_, id, &decommissioned);
    if (!d) return d.error();
    if (!*d) return make_error(Errc::not_found, "no device '" + id + "'");
    DeviceRecord dev = **d;
    if (decommissioned) {
      return make_error(Errc::conflict, "device " + id + " is decommissioned; its labels are frozen");
    }
    for (const auto& [k, v] : changes) {
      if (v) dev.labels[k] = *v;
      else dev.labels.erase(k);
    }
    // Bounded like everything else: selectors are evaluated against every
    // device's labels on every campaign and list.
    if (dev.labels.size() > 64) return make_error(Errc::invalid_argument, "a device may carry at most 64 labels");
    sql::Transaction tx(store_.db());
    if (auto s = store_.local_directory_write([&] { return store_.set_device_labels(id, dev.labels); }); !s) {
      return s.error();
    }
    note_member_zones({dev});
    if (auto s = tx.commit(); !s) return s.error();
    return dev;
  });
  if (edited) follow_own_write();  // live campaigns it now matches, or no longer does
  return edited;
}

Result<DeviceRecord> HubService::decommission_device(const std::string& id) {
  DeviceRecord dev;
  bool had_password = false;
  int64_t revoked = 0;
  bool counted_out = false;
  auto marked = control_write([&]() -> Status {
    std::lock_guard lock(store_mu_);
    bool was_decommissioned = false;
    auto d = device_record(store_, id, &was_decommissioned);
    if (!d) return d.error();
    if (!*d) return make_error(Errc::not_found, "no device '" + id + "'");
    dev = **d;
    // The store is the truth the broker's files are rebuilt from at every
    // start, so it changes first: a failed reload below still takes effect
    // at the next restart, and repeating the call is safe.
    sql::Transaction tx(store_.db());
    auto cred = store_.has_credential(id);
    if (!cred) return cred.error();
    had_password = *cred;
    if (auto s = store_.delete_credential(id); !s) return s.error();
    auto n = store_.revoke_device_certs(id, clock_.now_unix_ms());
    if (!n) return n.error();
    revoked = *n;
    if (auto s = store_.mark_device_decommissioned(id); !s) return s.error();
    counted_out = !was_decommissioned && dev.cell >= 0 && dev.cell < cell_count();
    return tx.commit();
  });
  if (!marked) return marked.error();
  {
    std::lock_guard lock(store_mu_);
    if (counted_out) --cell_devices_[static_cast<size_t>(dev.cell)];
    follow_directory();  // its inventory goes
  }
  dev.state = "decommissioned";
  dev.online = false;
  {
    // From now on nothing from it is taken, whatever is still on its way.
    std::lock_guard lock(decommissioned_mu_);
    decommissioned_.insert(id);
    any_decommissioned_ = true;
  }
  // A password device: mosquitto re-checks connected clients against the
  // reloaded password file, so its current session ends too.
  if (had_password) {
    if (auto s = sync_broker_credentials(); !s) {
      return s.error().with_context("device marked decommissioned, but the broker did not reload; retry");
    }
  }
  // A certificate device: its certificates go on the revocation list, the
  // one change that makes the broker reload, and its open connection is
  // taken over (the broker checks certificates only at connect).
  if (revoked > 0) {
    if (auto s = sync_broker_revocations(); !s) {
      return s.error().with_context("device marked decommissioned, but the broker did not load the revocation "
                                    "list; retry");
    }
  }
  Cell& home = *cells_.at(dev.cell >= 0 && dev.cell < cell_count() ? static_cast<size_t>(dev.cell) : 0);
  EmbeddedBroker* broker = home.broker();
  if (broker && broker->certificate_auth() && cfg_.device_ca && dev.gateway.empty()) {
    auto who = cfg_.device_ca->issue_client(id, clock_.now_unix(), 600);
    if (!who) return who.error().with_context("device marked decommissioned; take over its session");
    if (auto s = broker->take_over_session(ClientIdentity{who->pem, who->key_pem}); !s) {
      log::get("hub")->warn("decommissioned device={}: its session was not taken over: {}", id, s.error().message);
    }
  }
  if (transport::Transport* t = home.transport(); t && t->connected()) {
    // An empty retained message deletes the retained desired state.
    if (auto s = t->publish({transport::device_topic(id, dev.gateway, "desired"), "", 1, true}); !s) {
      log::get("hub")->warn("clear retained desired state device={} failed: {}", id, s.error().message);
    }
  }
  on_device_decommissioned(id);
  log::get("hub")->info("decommissioned device={} certificates_revoked={}", id, revoked);
  return dev;
}


Status HubService::append_audit(AuditRecord a) {
  if (a.time_ms == 0) a.time_ms = clock_.now_unix_ms();
  return control_write([&]() -> Status {
    std::lock_guard lock(store_mu_);
    auto id = store_.append_audit(a);
    if (!id) return id.error();
    return {};
  });
}

Result<std::vector<AuditRecord>> HubService::list_audit(int64_t after, int64_t limit, const std::string& project) {
  return read([&](Store& from) { return from.list_audit(after, limit, project); });
}

HubService::MqttCounters HubService::mqtt_counters() const {
  MqttCounters c;
  c.reports_received = reports_received_;
  c.presence_received = presence_received_;
  c.other_received = other_received_;
  c.gateway_batches_received = gateway_batches_received_;
  c.reports_processed = reports_processed_;
  c.presence_processed = presence_processed_;
  c.desired_published = desired_published_;
  c.desired_publish_failures = desired_publish_failures_;
  c.dropped_too_large = dropped_too_large_;
  c.log_lines_suppressed = log_limit_.suppressed_total();
  c.dropped_decommissioned = dropped_decommissioned_;
  c.certificates_issued = certificates_issued_;
  c.renewals = renewals_;
  for (const auto& cell : cells_) {
    if (!cell->broker()) continue;
    c.broker_reloads += cell->broker()->reloads();
    c.broker_restarts += cell->broker()->restarts();
  }
  c.presence_resets = presence_resets_;
  c.rollcalls = rollcalls_;
  c.stale_presence_ignored = stale_presence_ignored_;
  return c;
}

size_t HubService::queue_depth() {
  size_t n = 0;
  for (const auto& c : cells_) n += c->depth();
  return n;
}

}  // namespace flotilla::hub
