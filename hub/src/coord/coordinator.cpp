// What both coordination backends share: the convenience shapes over txn,
// the bounds, fencing, cell ownership and the hub's settings.
#include <algorithm>

#include "flotilla/common/log.hpp"
#include "flotilla/hub/coord.hpp"

namespace flotilla::hub::coord {

Status validate_key(const std::string& key) {
  if (key.empty()) return make_error(Errc::invalid_argument, "coordination key is empty");
  if (key.size() > kMaxKeyBytes) {
    return make_error(Errc::too_large, "coordination key is " + std::to_string(key.size()) + " bytes, over the " +
                                           std::to_string(kMaxKeyBytes) + "-byte limit");
  }
  return {};
}

Status validate_txn(const std::vector<Compare>& compares, const std::vector<Op>& ops) {
  if (compares.size() + ops.size() > kMaxOpsPerTxn) {
    return make_error(Errc::too_large, "transaction has " + std::to_string(compares.size() + ops.size()) +
                                           " compares and ops, over the limit of " + std::to_string(kMaxOpsPerTxn));
  }
  for (const auto& c : compares) FLOTILLA_TRY_STATUS(validate_key(c.key));
  for (const auto& o : ops) {
    FLOTILLA_TRY_STATUS(validate_key(o.key));
    if (o.value.size() > kMaxValueBytes) {
      return make_error(Errc::too_large, "value for '" + o.key + "' is " + std::to_string(o.value.size()) +
                                             " bytes, over the limit of " + std::to_string(kMaxValueBytes));
    }
    if (o.lease < 0) return make_error(Errc::invalid_argument, "negative lease id for '" + o.key + "'");
  }
  // As etcd: one key at most once per transaction, so the outcome never
  // depends on the order of ops.
  std::vector<std::string> keys;
  for (const auto& o : ops) keys.push_back(o.key);
  std::sort(keys.begin(), keys.end());
  if (auto d = std::adjacent_find(keys.begin(), keys.end()); d != keys.end()) {
    return make_error(Errc::invalid_argument, "key '" + *d + "' appears twice in one transaction");
  }
  return {};
}

Result<int64_t> Coordinator::create(const std::string& key, const std::string& value, LeaseId lease) {
  auto r = txn({Compare::absent(key)}, {Op::put(key, value, lease)});
  if (!r) return r.error();
  if (!r->succeeded) return make_error(Errc::already_exists, "'" + key + "' already exists");
  return r->revision;
}

Result<int64_t> Coordinator::compare_and_swap(const std::string& key, int64_t expected, const std::string& value,
                                              LeaseId lease) {
  auto r = txn({Compare::mod_revision_is(key, expected)}, {Op::put(key, value, lease)});
  if (!r) return r.error();
  if (!r->succeeded) {
    return make_error(Errc::conflict, "'" + key + "' changed since revision " + std::to_string(expected));
  }
  return r->revision;
}

Result<int64_t> Coordinator::put(const std::string& key, const std::string& value, LeaseId lease) {
  auto r = txn({}, {Op::put(key, value, lease)});
  if (!r) return r.error();
  return r->revision;
}

Result<bool> Coordinator::remove(const std::string& key) {
  // Guarded by the revision just read, so "true" means this call deleted it.
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto cur = get(key);
    if (!cur) return cur.error();
    if (!*cur) return false;
    auto r = txn({Compare::mod_revision_is(key, (*cur)->mod_revision)}, {Op::remove(key)});
    if (!r) return r.error();
    if (r->succeeded) return true;
  }
  return make_error(Errc::conflict, "'" + key + "' kept changing while being deleted", true);
}

// ---- Fencing -----------------------------------------------------------

std::vector<Compare> fence_compares(const Fence& f) {
  // Existence with our lease AND the very revisions we created it at: a key
  // re-created by someone else (or by us under a new lease) fails both.
  return {Compare::lease_is(f.owner_key, f.lease), Compare::create_revision_is(f.owner_key, f.revision),
          Compare::mod_revision_is(f.owner_key, f.revision)};
}

Result<TxnResult> guarded_txn(Coordinator& c, const Fence& fence, std::vector<Compare> extra,
                              const std::vector<Op>& ops) {
  if (fence.owner_key.empty() || fence.lease == 0 || fence.revision <= 0) {
    return make_error(Errc::invalid_argument, "guarded write without a fence");
  }
  auto compares = fence_compares(fence);
  compares.insert(compares.end(), std::make_move_iterator(extra.begin()), std::make_move_iterator(extra.end()));
  auto r = c.txn(compares, ops);
  if (!r) return r.error();
  if (!r->succeeded) {
    // Tell a stale fence apart from a failed extra condition.
    auto owner = c.get(fence.owner_key);
    if (!owner) return owner.error();
    const bool ours = *owner && (*owner)->lease == fence.lease && (*owner)->create_revision == fence.revision &&
                      (*owner)->mod_revision == fence.revision;
    if (!ours) {
      return make_error(Errc::refused, "stale fence: " + fence.owner_key + " is no longer held at revision " +
                                           std::to_string(fence.revision) + " under lease " +
                                           std::to_string(fence.lease));
    }
  }
  return r;
}

// ---- CellOwnership -----------------------------------------------------

namespace {
const std::shared_ptr<spdlog::logger>& clog() {
  static auto l = flotilla::log::get("coord");
  return l;
}
}  // namespace

CellOwnership::CellOwnership(Coordinator& c, std::string holder, std::chrono::seconds ttl, const Clock& clock)
    : c_(c), holder_(std::move(holder)), ttl_(ttl), clock_(clock) {}

std::string CellOwnership::owner_key(const std::string& cell) { return kOwnersPrefix + cell + "/owner"; }

std::optional<int> CellOwnership::cell_of_owner_key(const std::string& key) {
  const std::string_view prefix = kOwnersPrefix, suffix = "/owner";
  if (key.size() <= prefix.size() + suffix.size() || key.compare(0, prefix.size(), prefix) != 0 ||
      key.compare(key.size() - suffix.size(), suffix.size(), suffix) != 0) {
    return std::nullopt;
  }
  return parse_cell_id(std::string_view(key).substr(prefix.size(), key.size() - prefix.size() - suffix.size()));
}

std::optional<int> CellOwnership::parse_cell_id(std::string_view text) {
  if (text.empty() || text.size() > 3 || text.find_first_not_of("0123456789") != std::string_view::npos) {
    return std::nullopt;
  }
  return std::stoi(std::string(text));
}

Status CellOwnership::start() {
  if (ttl_.count() < 1) return make_error(Errc::invalid_argument, "cell lease TTL must be at least 1s");
  auto l = c_.grant_lease(ttl_);
  if (!l) return l.error().with_context("cell ownership: grant lease");
  lease_ = l->id;
  last_renew_ = clock_.monotonic();
  owned_.clear();
  return {};
}

Result<Fence> CellOwnership::claim(const std::string& cell) {
  if (lease_ == 0) return make_error(Errc::invalid_argument, "cell ownership not started");
  if (cell.empty() || cell.find('/') != std::string::npos || cell.size() > 128) {
    return make_error(Errc::invalid_argument, "bad cell id '" + cell + "'");
  }
  if (auto it = owned_.find(cell); it != owned_.end()) return it->second;
  const std::string key = owner_key(cell);
  auto rev = c_.create(key, holder_, lease_);
  if (!rev) {
    if (rev.error().code != Errc::already_exists) return rev.error();
    auto cur = c_.get(key);
    if (!cur) return cur.error();
    if (!*cur) return make_error(Errc::already_exists, "cell " + cell + " changed hands; retry", true);
    if ((*cur)->lease == lease_) {
      // Ours already (a claim whose answer was lost): take its revision.
      Fence f{key, lease_, (*cur)->create_revision};
      owned_[cell] = f;
      return f;
    }
    return make_error(Errc::already_exists, "cell " + cell + " is owned by " + (*cur)->value);
  }
  Fence f{key, lease_, *rev};
  owned_[cell] = f;
  clog()->info("claimed cell={} holder={} fence={}", cell, holder_, *rev);
  return f;
}

Result<std::vector<std::string>> CellOwnership::claim_unowned(const std::vector<std::string>& cells) {
  std::vector<std::string> taken;
  for (const auto& cell : cells) {
    if (owned_.count(cell)) continue;  // only the newly taken are reported
    auto f = claim(cell);
    if (f) {
      taken.push_back(cell);
    } else if (f.error().code != Errc::already_exists) {
      return f.error();
    }
  }
  return taken;
}

Status CellOwnership::renew() {
  if (lease_ == 0) return make_error(Errc::invalid_argument, "cell ownership not started");
  auto r = c_.keep_alive(lease_);
  if (!r) {
    if (r.error().code == Errc::not_found) {
      std::vector<std::string> lost;
      for (const auto& [cell, f] : owned_) lost.push_back(cell);
      clog()->warn("lease lost holder={} lease={} cells={}", holder_, lease_, lost.size());
      owned_.clear();
      lease_ = 0;
      return make_error(Errc::refused, "cell lease expired: every cell of " + holder_ + " is lost");
    }
    return r.error();
  }
  last_renew_ = clock_.monotonic();
  return {};
}

Status CellOwnership::tick() {
  if (clock_.monotonic() - last_renew_ < ttl_ / 3) return {};
  return renew();
}

Result<std::vector<std::string>> CellOwnership::verify() {
  std::vector<std::string> lost;
  for (auto it = owned_.begin(); it != owned_.end();) {
    auto cur = c_.get(it->second.owner_key);
    if (!cur) return cur.error();
    const bool ours = *cur && (*cur)->lease == it->second.lease && (*cur)->create_revision == it->second.revision;
    if (ours) {
      ++it;
      continue;
    }
    clog()->warn("cell lost cell={} holder={}", it->first, holder_);
    lost.push_back(it->first);
    it = owned_.erase(it);
  }
  return lost;
}

std::vector<std::string> CellOwnership::cells() const {
  std::vector<std::string> out;
  for (const auto& [cell, f] : owned_) out.push_back(cell);
  return out;
}

std::optional<Fence> CellOwnership::fence(const std::string& cell) const {
  auto it = owned_.find(cell);
  if (it == owned_.end()) return std::nullopt;
  return it->second;
}

Status CellOwnership::release(const std::string& cell) {
  auto it = owned_.find(cell);
  if (it == owned_.end()) return {};
  // Only our own key: never delete a successor's.
  auto r = c_.txn(fence_compares(it->second), {Op::remove(it->second.owner_key)});
  if (!r) return r.error();
  owned_.erase(it);
  return {};
}

Status CellOwnership::close() {
  if (lease_ == 0) return {};
  auto s = c_.revoke_lease(lease_);
  if (!s) return s;
  owned_.clear();
  lease_ = 0;
  return {};
}

Result<TxnResult> CellOwnership::guarded_put(const std::string& cell, const std::string& key,
                                             const std::string& value) {
  auto f = fence(cell);
  if (!f) return make_error(Errc::refused, "cell " + cell + " is not owned by " + holder_);
  auto r = guarded_txn(c_, *f, {}, {Op::put(key, value)});
  if (!r && r.error().code == Errc::refused) owned_.erase(cell);
  return r;
}

// ---- Settings ----------------------------------------------------------

void add_coordination_options(Options& o) {
  o.add("coordination", "where hub processes coordinate: sqlite (embedded, one hub) or etcd (several hubs; "
                        "needs etcd-endpoints)", "sqlite")
      .add_list("etcd-endpoints", "etcd client URLs (http:// or https://), tried in order with failover")
      .add("etcd-ca", "CA file for https:// etcd endpoints (default: the system CA store)")
      .add("etcd-cert", "client certificate for etcd (with etcd-key), when etcd requires client certificates")
      .add("etcd-key", "client key for etcd (with etcd-cert)")
      .add("etcd-timeout", "deadline of one etcd request on one endpoint before failing over", "5s");
}

Result<CoordinationConfig> coordination_config_from(const Options& o) {
  CoordinationConfig c;
  const std::string backend = o.get("coordination");
  if (backend == "sqlite") {
    c.backend = CoordinationConfig::Backend::sqlite;
  } else if (backend == "etcd") {
    c.backend = CoordinationConfig::Backend::etcd;
  } else {
    return make_error(Errc::invalid_argument, "coordination must be sqlite or etcd, got '" + backend + "' (from " +
                                                  o.source("coordination") + ")");
  }
  c.etcd.endpoints = o.get_list("etcd-endpoints");
  c.etcd.ca_file = o.get("etcd-ca");
  c.etcd.cert_file = o.get("etcd-cert");
  c.etcd.key_file = o.get("etcd-key");
  auto t = o.get_duration("etcd-timeout");
  if (!t) return t.error().with_context("etcd-timeout");
  if (*t < std::chrono::milliseconds(100) || *t > std::chrono::minutes(5)) {
    return make_error(Errc::invalid_argument, "etcd-timeout must be between 100ms and 5m");
  }
  c.etcd.request_timeout = *t;
  c.etcd.connect_timeout = std::min<std::chrono::milliseconds>(*t, std::chrono::milliseconds(2000));
  const bool etcd_settings = !c.etcd.endpoints.empty() || !c.etcd.ca_file.empty() || !c.etcd.cert_file.empty() ||
                             !c.etcd.key_file.empty();
  if (c.backend == CoordinationConfig::Backend::sqlite) {
    if (etcd_settings) {
      return make_error(Errc::invalid_argument,
                        "etcd-endpoints, etcd-ca, etcd-cert and etcd-key need coordination: etcd (it is sqlite)");
    }
    return c;
  }
  if (c.etcd.endpoints.empty()) return make_error(Errc::invalid_argument, "coordination etcd needs etcd-endpoints");
  // open_etcd_coordinator's own checks (URLs, TLS files) are the rest.
  auto probe = open_etcd_coordinator(c.etcd);
  if (!probe) return probe.error();
  return c;
}

Result<std::unique_ptr<Coordinator>> open_coordinator(const CoordinationConfig& cfg, const std::string& data_dir) {
  if (cfg.backend == CoordinationConfig::Backend::etcd) return open_etcd_coordinator(cfg.etcd);
  return open_sqlite_coordinator(SqliteCoordOptions{data_dir + "/coord.db"});
}

}  // namespace flotilla::hub::coord
