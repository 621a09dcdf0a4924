// The federation's own SQLite: regions (with their tokens, in this file only)
// and federated campaigns with each region's part. The file is created 0600
// (the hub's umask); nothing here is ever logged.
#include "flotilla/hub/federation.hpp"

namespace flotilla::hub::federation {

namespace {

// Stmt::bind has string_view and optional<string> overloads.
std::string_view sv(const std::string& s) { return s; }

constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS regions (
  name TEXT PRIMARY KEY,
  url TEXT NOT NULL,
  ca_pem TEXT NOT NULL,
  token TEXT NOT NULL,
  created_ms INTEGER NOT NULL,
  state TEXT NOT NULL DEFAULT 'unknown',
  last_answer_ms INTEGER NOT NULL DEFAULT 0,
  error TEXT NOT NULL DEFAULT '',
  last_campaigns TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS fed_campaigns (
  id TEXT PRIMARY KEY,
  doc TEXT NOT NULL,
  state TEXT NOT NULL,
  created_ms INTEGER NOT NULL
);
)sql";

json threshold_json(const RegionThreshold& t) { return {{"percent", t.percent}, {"min_sample", t.min_sample}}; }
RegionThreshold threshold_from(const json& j) {
  RegionThreshold t;
  t.percent = j.value("percent", 10.0);
  t.min_sample = j.value("min_sample", int64_t{1});
  return t;
}

// A campaign is one JSON document: it is read and written whole, by one
// engine, and its parts are few (one per region).
json to_doc(const FedCampaign& c) {
  json parts = json::array();
  for (const auto& p : c.parts) {
    parts.push_back({{"region", p.region}, {"step", p.step}, {"regional_id", p.regional_id}, {"state", p.state},
                     {"counts", p.counts}, {"last_answer_ms", p.last_answer_ms}, {"reachable", p.reachable},
                     {"error", p.error}, {"create_sent_ms", p.create_sent_ms}});
  }
  json thresholds = json::object();
  for (const auto& [r, t] : c.thresholds) thresholds[r] = threshold_json(t);
  return {{"id", c.id},
          {"name", c.name},
          {"project", c.project},
          {"bundle_id", c.bundle_id},
          {"bundle_name", c.bundle_name},
          {"bundle_version", c.bundle_version},
          {"selector", c.selector},
          {"strategy", c.strategy},
          {"steps", c.steps},
          {"thresholds", thresholds},
          {"default_threshold", threshold_json(c.default_threshold)},
          {"soak_ms", c.soak_ms},
          {"state", fed_state_name(c.state)},
          {"state_reason", c.state_reason},
          {"current_step", c.current_step},
          {"step_done_ms", c.step_done_ms},
          {"created_ms", c.created_ms},
          {"updated_ms", c.updated_ms},
          {"parts", parts}};
}

Result<FedCampaign> from_doc(const std::string& text) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return make_error(Errc::internal, "federated campaign row is not JSON");
  FedCampaign c;
  try {
    c.id = j.at("id");
    c.name = j.value("name", "");
    c.project = j.value("project", "default");
    c.bundle_id = j.at("bundle_id");
    c.bundle_name = j.value("bundle_name", "");
    c.bundle_version = j.value("bundle_version", uint64_t{0});
    c.selector = j.value("selector", "");
    c.strategy = j.value("strategy", json::object());
    c.steps = j.at("steps").get<std::vector<std::vector<std::string>>>();
    if (auto th = j.find("thresholds"); th != j.end() && th->is_object()) {
      for (auto it = th->begin(); it != th->end(); ++it) c.thresholds[it.key()] = threshold_from(it.value());
    }
    c.default_threshold = threshold_from(j.value("default_threshold", json::object()));
    c.soak_ms = j.value("soak_ms", int64_t{0});
    c.state = parse_fed_state(j.at("state")).value_or(FedState::stopped);
    c.state_reason = j.value("state_reason", "");
    c.current_step = j.value("current_step", 0);
    c.step_done_ms = j.value("step_done_ms", int64_t{0});
    c.created_ms = j.value("created_ms", int64_t{0});
    c.updated_ms = j.value("updated_ms", int64_t{0});
    const json no_parts = json::array();
    auto pj = j.find("parts");
    for (const auto& p : (pj != j.end() && pj->is_array()) ? *pj : no_parts) {
      RegionPart rp;
      rp.region = p.at("region");
      rp.step = p.value("step", 0);
      rp.regional_id = p.value("regional_id", "");
      rp.state = p.value("state", "");
      rp.counts = p.value("counts", json::object());
      rp.last_answer_ms = p.value("last_answer_ms", int64_t{0});
      rp.reachable = p.value("reachable", true);
      rp.error = p.value("error", "");
      rp.create_sent_ms = p.value("create_sent_ms", int64_t{0});
      c.parts.push_back(std::move(rp));
    }
  } catch (const std::exception& e) {
    return make_error(Errc::internal, std::string("federated campaign row: ") + e.what());
  }
  return c;
}

Region region_row(const sql::Stmt& st) {
  Region r;
  r.name = st.col_text(0);
  r.url = st.col_text(1);
  r.ca_pem = st.col_text(2);
  r.token = st.col_text(3);
  r.created_ms = st.col_int(4);
  r.state = st.col_text(5);
  r.last_answer_ms = st.col_int(6);
  r.error = st.col_text(7);
  return r;
}

constexpr const char* kRegionColumns = "name, url, ca_pem, token, created_ms, state, last_answer_ms, error";

}  // namespace

std::string fed_state_name(FedState s) {
  switch (s) {
    case FedState::running: return "running";
    case FedState::soaking: return "soaking";
    case FedState::paused: return "paused";
    case FedState::stopped: return "stopped";
    case FedState::aborted: return "aborted";
    case FedState::completed: return "completed";
  }
  return "stopped";
}

std::optional<FedState> parse_fed_state(const std::string& s) {
  for (FedState f : {FedState::running, FedState::soaking, FedState::paused, FedState::stopped, FedState::aborted,
                     FedState::completed}) {
    if (fed_state_name(f) == s) return f;
  }
  return std::nullopt;
}

Result<std::unique_ptr<FederationStore>> FederationStore::open(const std::string& path) {
  auto db = sql::Db::open(path);
  if (!db) return db.error().with_context("federation store " + path);
  if (auto s = (*db)->exec(kSchema); !s) return s.error().with_context("federation schema");
  return std::unique_ptr<FederationStore>(new FederationStore(std::move(*db)));
}

Status FederationStore::add_region(const Region& r) {
  std::lock_guard lock(mu_);
  auto st = db_->prepare("INSERT INTO regions (name, url, ca_pem, token, created_ms) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT(name) DO NOTHING");
  if (!st) return st.error();
  st->bind(1, sv(r.name)).bind(2, sv(r.url)).bind(3, sv(r.ca_pem)).bind(4, sv(r.token)).bind(5, r.created_ms);
  if (auto s = st->run(); !s) return s;
  if (db_->changes() == 0) return make_error(Errc::already_exists, "region '" + r.name + "' already exists");
  return {};
}

Result<std::vector<Region>> FederationStore::list_regions() {
  std::lock_guard lock(mu_);
  return sql::query<Region>(*db_, std::string("SELECT ") + kRegionColumns + " FROM regions ORDER BY name", region_row);
}

Result<std::optional<Region>> FederationStore::get_region(const std::string& name) {
  std::lock_guard lock(mu_);
  auto rows = sql::query<Region>(
      *db_, std::string("SELECT ") + kRegionColumns + " FROM regions WHERE name = ?",
      [&](sql::Stmt& st) { st.bind(1, sv(name)); }, region_row);
  if (!rows) return rows.error();
  if (rows->empty()) return std::optional<Region>();
  return std::optional<Region>(rows->front());
}

Result<bool> FederationStore::remove_region(const std::string& name) {
  std::lock_guard lock(mu_);
  auto st = db_->prepare("DELETE FROM regions WHERE name = ?");
  if (!st) return st.error();
  st->bind(1, sv(name));
  if (auto s = st->run(); !s) return s.error();
  return db_->changes() > 0;
}

Status FederationStore::note_answer(const std::string& name, bool ok, const std::string& error, int64_t now_ms) {
  std::lock_guard lock(mu_);
  // last_answer_ms moves only when the region answered: an unreachable
  // region keeps the time of its last answer.
  auto st = db_->prepare(ok ? "UPDATE regions SET state = 'ok', error = '', last_answer_ms = ? WHERE name = ?"
                            : "UPDATE regions SET state = 'unreachable', error = ? WHERE name = ?");
  if (!st) return st.error();
  if (ok) st->bind(1, now_ms);
  else st->bind(1, sv(error.substr(0, 512)));
  st->bind(2, sv(name));
  return st->run();
}

Status FederationStore::keep_campaign_list(const std::string& name, const json& items) {
  std::lock_guard lock(mu_);
  auto st = db_->prepare("UPDATE regions SET last_campaigns = ? WHERE name = ?");
  if (!st) return st.error();
  st->bind(1, sv(items.dump())).bind(2, sv(name));
  return st->run();
}

Result<json> FederationStore::last_campaign_list(const std::string& name) {
  std::lock_guard lock(mu_);
  auto rows = sql::query<std::string>(
      *db_, "SELECT last_campaigns FROM regions WHERE name = ?", [&](sql::Stmt& st) { st.bind(1, sv(name)); },
      [](const sql::Stmt& st) { return st.col_text(0); });
  if (!rows) return rows.error();
  if (rows->empty()) return json::array();
  json j = json::parse(rows->front(), nullptr, false);
  return j.is_array() ? j : json::array();
}

Status FederationStore::save_campaign(const FedCampaign& c) {
  std::lock_guard lock(mu_);
  auto st = db_->prepare("INSERT INTO fed_campaigns (id, doc, state, created_ms) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT(id) DO UPDATE SET doc = excluded.doc, state = excluded.state");
  if (!st) return st.error();
  st->bind(1, sv(c.id)).bind(2, sv(to_doc(c).dump())).bind(3, sv(fed_state_name(c.state))).bind(4, c.created_ms);
  return st->run();
}

Result<std::optional<FedCampaign>> FederationStore::get_campaign(const std::string& id) {
  std::lock_guard lock(mu_);
  auto rows = sql::query<std::string>(
      *db_, "SELECT doc FROM fed_campaigns WHERE id = ?", [&](sql::Stmt& st) { st.bind(1, sv(id)); },
      [](const sql::Stmt& st) { return st.col_text(0); });
  if (!rows) return rows.error();
  if (rows->empty()) return std::optional<FedCampaign>();
  auto c = from_doc(rows->front());
  if (!c) return c.error();
  return std::optional<FedCampaign>(std::move(*c));
}

Result<std::vector<FedCampaign>> FederationStore::list_campaigns() {
  std::lock_guard lock(mu_);
  auto rows = sql::query<std::string>(*db_, "SELECT doc FROM fed_campaigns ORDER BY created_ms, id",
                                      [](const sql::Stmt& st) { return st.col_text(0); });
  if (!rows) return rows.error();
  std::vector<FedCampaign> out;
  for (const auto& d : *rows) {
    auto c = from_doc(d);
    if (!c) return c.error();
    out.push_back(std::move(*c));
  }
  return out;
}

Result<std::vector<std::string>> FederationStore::live_campaign_ids() {
  std::lock_guard lock(mu_);
  return sql::query<std::string>(
      *db_, "SELECT id FROM fed_campaigns WHERE state IN ('running', 'soaking', 'paused') ORDER BY created_ms, id",
      [](const sql::Stmt& st) { return st.col_text(0); });
}

}  // namespace flotilla::hub::federation
