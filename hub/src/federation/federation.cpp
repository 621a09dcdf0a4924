// The federation: regions checked before they are stored, parallel fan-out
// with a deadline, and federated campaigns that run region by region.
#include <algorithm>
#include <future>
#include <set>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/http_client.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/x509.hpp"
#include "flotilla/hub/campaign.hpp"
#include "flotilla/hub/federation.hpp"

namespace flotilla::hub::federation {

namespace {
// Artifacts travel to a region in one request body: a cap keeps the
// federation's memory bounded (docs/operations.md, "Federation").
constexpr size_t kMaxArtifactBytes = size_t{256} << 20;
constexpr size_t kMaxTokenBytes = 512;
constexpr size_t kMaxPlanRegions = 64;

int64_t count_of(const json& counts, const char* key) {
  auto it = counts.find(key);
  return it != counts.end() && it->is_number_integer() ? it->get<int64_t>() : 0;
}

bool regional_finished(const std::string& state) {
  return state == "completed" || state == "aborted" || state == "rolled_back";
}
}  // namespace

void add_federation_options(Options& o) {
  o.add("role", "hub (a regional hub with its own devices and brokers) or federation (fronts regional hubs "
                "through their REST API; docs/operations.md, \"Federation\")",
        "hub")
      .add("federation-region-timeout", "federation role: deadline of every request to a region (fan-outs ask "
                                        "regions in parallel)",
           "5s")
      .add("federation-poll-interval", "federation role: how often running federated campaigns ask their regions "
                                       "for status",
           "2s");
}

Result<FederationConfig> federation_config_from(const Options& o) {
  FederationConfig c;
  auto t = o.get_duration("federation-region-timeout");
  if (!t) return make_error(Errc::invalid_argument, "federation-region-timeout: " + t.error().message);
  if (*t < std::chrono::milliseconds(100) || *t > std::chrono::minutes(5)) {
    return make_error(Errc::invalid_argument, "federation-region-timeout must be from 100ms to 5m, got '" +
                                                  o.get("federation-region-timeout") + "' (from " +
                                                  o.source("federation-region-timeout") + ")");
  }
  c.region_timeout = *t;
  auto p = o.get_duration("federation-poll-interval");
  if (!p) return make_error(Errc::invalid_argument, "federation-poll-interval: " + p.error().message);
  if (*p < std::chrono::milliseconds(100) || *p > std::chrono::minutes(10)) {
    return make_error(Errc::invalid_argument, "federation-poll-interval must be from 100ms to 10m, got '" +
                                                  o.get("federation-poll-interval") + "' (from " +
                                                  o.source("federation-poll-interval") + ")");
  }
  c.poll_interval = *p;
  return c;
}

bool valid_region_name(const std::string& name) {
  if (name.empty() || name.size() > 63) return false;
  if (!std::isalnum(static_cast<unsigned char>(name[0]))) return false;
  return std::all_of(name.begin(), name.end(), [](char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-';
  });
}

std::string RegionAnswer::summary() const {
  if (!reached) return "unreachable: " + error;
  std::string s = std::to_string(status);
  if (status >= 300 && body.is_object() && body.contains("error")) {
    s += " " + body["error"].value("code", "") + ": " + body["error"].value("message", "");
  }
  return s.substr(0, 400);
}

Result<std::string> RegionClient::ca_file(const Region& r) const {
  // Named by content: a region whose CA is replaced gets a new file, and
  // concurrent callers never see a half-written one.
  const auto path = ca_dir_ / (crypto::sha256_hex(r.ca_pem).substr(0, 24) + ".pem");
  if (!std::filesystem::exists(path)) {
    if (auto s = fs::write_file_atomic(path, r.ca_pem, 0644); !s) return s.error();
  }
  return path.string();
}

RegionAnswer RegionClient::call(const Region& r, const std::string& method, const std::string& path,
                                const std::string& body, const std::string& content_type,
                                const std::map<std::string, std::string>& headers) const {
  RegionAnswer a;
  auto ca = ca_file(r);
  if (!ca) {
    a.error = "cannot write the region's CA file: " + ca.error().message;
    return a;
  }
  http::Request req;
  req.method = method;
  std::string base = r.url;
  while (!base.empty() && base.back() == '/') base.pop_back();
  req.url = base + path;
  req.body = body;
  req.headers = headers;
  req.headers["Authorization"] = "Bearer " + r.token;
  if (!body.empty()) req.headers["Content-Type"] = content_type;
  req.timeout = timeout_;
  req.ca_file = *ca;
  req.max_response_bytes = 32u << 20;
  auto resp = http::send(req);
  if (!resp) {
    a.error = resp.error().message.substr(0, 300);
    return a;
  }
  a.reached = true;
  a.status = resp->status;
  a.body = json::parse(resp->body, nullptr, false);
  if (a.body.is_discarded()) a.body = nullptr;
  return a;
}

Federation::Federation(FederationStore& store, const Clock& clock, FederationConfig cfg, std::filesystem::path ca_dir,
                       AuditSink audit, BundleSource bundles, ArtifactSource artifacts)
    : store_(store),
      clock_(clock),
      cfg_(cfg),
      client_(std::move(ca_dir), cfg.region_timeout),
      audit_(std::move(audit)),
      bundles_(std::move(bundles)),
      artifacts_(std::move(artifacts)) {}

Federation::~Federation() { stop(); }

Result<Region> Federation::add_region(Region r) {
  if (!valid_region_name(r.name)) {
    return make_error(Errc::invalid_argument, "bad region name '" + r.name.substr(0, 80) +
                                                  "': 1 to 63 of a-z, 0-9 and '-', starting with a letter or digit");
  }
  auto u = http::parse_url(r.url);
  if (!u) return make_error(Errc::invalid_argument, "bad region url '" + r.url.substr(0, 200) + "': " + u.error().message);
  // Regions are reached over TLS checked against their CA, never in plain
  // HTTP and never without verification.
  if (u->scheme != "https") {
    return make_error(Errc::invalid_argument, "region url must be https:// (the federation verifies each region's "
                                              "certificate against its CA), got '" + r.url.substr(0, 200) + "'");
  }
  if (u->target != "/" && !u->target.empty()) {
    return make_error(Errc::invalid_argument, "region url is the region's base URL (https://host:port), without a "
                                              "path; got '" + r.url.substr(0, 200) + "'");
  }
  while (!r.url.empty() && r.url.back() == '/') r.url.pop_back();
  if (r.ca_pem.empty() || r.ca_pem.size() > x509::kMaxPemBytes || x509::count_certificates(r.ca_pem) == 0) {
    return make_error(Errc::invalid_argument, "ca_pem must hold the PEM certificate(s) of the CA that signed the "
                                              "region's TLS certificate (at most 64 KiB)");
  }
  if (auto ci = x509::parse_certificate_pem(r.ca_pem); !ci) {
    return make_error(Errc::invalid_argument, "ca_pem is not a readable certificate: " + ci.error().message);
  }
  if (r.token.empty() || r.token.size() > kMaxTokenBytes ||
      std::any_of(r.token.begin(), r.token.end(), [](char ch) { return ch <= ' ' || ch == 0x7f; })) {
    return make_error(Errc::invalid_argument, "token must be the region's API token (printable, no spaces, at most "
                                              "512 bytes)");
  }
  auto existing = store_.get_region(r.name);
  if (!existing) return existing.error();
  if (*existing) return make_error(Errc::already_exists, "region '" + r.name + "' already exists; remove it first");

  // The region must answer over verified TLS and accept the token with
  // exactly the rights the federation needs.
  RegionAnswer who = client_.call(r, "GET", "/v1/whoami");
  if (!who.reached) {
    return make_error(Errc::invalid_argument, "region '" + r.name + "' at " + r.url +
                                                  " did not answer over TLS verified against the given CA: " + who.error);
  }
  if (who.status == 401) {
    return make_error(Errc::invalid_argument, "region '" + r.name + "' refused the token (401): give the federation "
                                              "an API token made at that region");
  }
  if (who.status != 200 || !who.body.is_object()) {
    return make_error(Errc::invalid_argument, "region '" + r.name + "' answered GET /v1/whoami with " + who.summary() +
                                                  "; is it a Flotilla hub?");
  }
  const std::string role = who.body.value("role", ""), project = who.body.value("project", "");
  if (role != "operator" || project != "*") {
    return make_error(Errc::invalid_argument,
                      "the region token has role '" + role + "' and project '" + project +
                          "'; the federation needs exactly an operator token of project \"*\" at the region (flotilla "
                          "token create federation --role operator --project '*'; docs/operations.md, \"Federation\")");
  }
  r.created_ms = clock_.now_unix_ms();
  if (auto s = store_.add_region(r); !s) return s.error();
  (void)store_.note_answer(r.name, true, "", r.created_ms);
  log::get("federation")->info("added region={} url={}", r.name, r.url);
  r.state = "ok";
  r.last_answer_ms = r.created_ms;
  return r;
}

Result<std::vector<Federation::FanOut>> Federation::fan_out(const std::string& path_for_all,
                                                            const std::function<std::string(const Region&)>& path_of,
                                                            const std::string& only) {
  auto regions = store_.list_regions();
  if (!regions) return regions.error();
  std::vector<Region> chosen;
  for (auto& r : *regions) {
    if (only.empty() || r.name == only) chosen.push_back(std::move(r));
  }
  if (!only.empty() && chosen.empty()) return make_error(Errc::not_found, "no region '" + only + "'");
  // One thread per region: each request has the region deadline, so the
  // whole fan-out takes about as long as the slowest region, bounded.
  std::vector<std::future<RegionAnswer>> futures;
  for (const auto& r : chosen) {
    std::string path = path_of ? path_of(r) : path_for_all;
    futures.push_back(std::async(std::launch::async, [this, r, path] {
      if (path.empty()) return RegionAnswer{true, 204, nullptr, ""};  // nothing to ask (its cursor is done)
      return client_.call(r, "GET", path);
    }));
  }
  std::vector<FanOut> out;
  const int64_t now = clock_.now_unix_ms();
  for (size_t i = 0; i < chosen.size(); ++i) {
    FanOut f{chosen[i], futures[i].get()};
    if (f.answer.status != 204) {
      (void)store_.note_answer(f.region.name, f.answer.reached, f.answer.error, now);
      f.region.state = f.answer.reached ? "ok" : "unreachable";
      if (f.answer.reached) f.region.last_answer_ms = now;
      f.region.error = f.answer.reached ? "" : f.answer.error;
    }
    out.push_back(std::move(f));
  }
  return out;
}

json Federation::region_status(const Region& r) const {
  return {{"region", r.name}, {"state", r.state}, {"last_answer_at", iso_ms(r.last_answer_ms)}, {"error", r.error}};
}

// ---- Federated campaigns ----

Result<FedCampaign> Federation::create_campaign(FedCampaign c, const Caller& caller) {
  if (c.steps.empty()) return make_error(Errc::invalid_argument, "'regions' must name at least one region");
  std::set<std::string> seen;
  for (const auto& step : c.steps) {
    if (step.empty()) return make_error(Errc::invalid_argument, "a group of regions in 'regions' is empty");
    for (const auto& name : step) {
      auto r = store_.get_region(name);
      if (!r) return r.error();
      if (!*r) return make_error(Errc::invalid_argument, "no region '" + name.substr(0, 80) + "' (flotilla region list)");
      if (!seen.insert(name).second) {
        return make_error(Errc::invalid_argument, "region '" + name + "' appears twice in 'regions'");
      }
    }
  }
  if (seen.size() > kMaxPlanRegions) return make_error(Errc::invalid_argument, "at most 64 regions per campaign");
  for (const auto& [name, t] : c.thresholds) {
    if (!seen.count(name)) {
      return make_error(Errc::invalid_argument, "'thresholds' names region '" + name + "', which is not in 'regions'");
    }
  }
  auto check_threshold = [](const RegionThreshold& t) -> Status {
    if (!(t.percent >= 0 && t.percent <= 100) || t.min_sample < 1 || t.min_sample > 10000000) {
      return make_error(Errc::invalid_argument, "a region threshold needs percent 0..100 and min_sample >= 1");
    }
    return {};
  };
  if (auto s = check_threshold(c.default_threshold); !s) return s.error();
  for (const auto& [name, t] : c.thresholds) {
    if (auto s = check_threshold(t); !s) return s.error();
  }
  if (c.soak_ms < 0 || c.soak_ms > int64_t{24} * 3600 * 1000) {
    return make_error(Errc::invalid_argument, "'soak' must be from 0s to 24h");
  }
  if (auto sel = bundles::Selector::parse(c.selector); !sel) return sel.error();
  // The strategy is checked here as each region will check it, so a typo is
  // refused before any region receives anything.
  if (auto st = Strategy::from_json(c.strategy.is_null() ? json::object() : c.strategy); !st) return st.error();
  auto b = bundles_(c.bundle_id, caller.project);
  if (!b) return b.error();
  // The bundle's project, which the caller may see: the campaign's.
  c.project = b->project;
  c.bundle_name = b->name;
  c.bundle_version = b->version;
  c.id = "f-" + to_hex(crypto::random_bytes(8));
  if (c.name.empty()) c.name = c.id;
  c.state = FedState::running;
  c.current_step = 0;
  c.created_ms = c.updated_ms = clock_.now_unix_ms();
  if (auto s = store_.save_campaign(c); !s) return s.error();
  log::get("federation")->info("created federated campaign={} regions={} project={}", c.id, seen.size(), c.project);
  stop_cv_.notify_all();  // the engine starts the first step now, not at its next poll
  return c;
}

void Federation::audit_region(const std::string& method, const std::string& path, const Region& r,
                              const RegionAnswer& a, const std::string& detail, const std::string& project) {
  AuditRecord rec;
  rec.actor = "federation";
  rec.actor_name = "region " + r.name;
  rec.role = "federation";
  rec.project = project;
  rec.method = method;
  rec.path = ("region:" + r.name + " " + method + " " + path).substr(0, 512);
  rec.status = a.reached ? a.status : 0;
  rec.detail = (detail + "; region answered: " + a.summary()).substr(0, 1000);
  rec.peer = r.url;
  audit_(std::move(rec));
}

Status Federation::start_region(FedCampaign& c, RegionPart& part, const Region& r) {
  const std::string regional_name = "fed-" + c.id;
  // After a federation restart the regional campaign may already exist
  // (created, then the federation died before saving): found by its name,
  // never made twice.
  if (part.regional_id.empty()) {
    RegionAnswer list = client_.call(r, "GET", "/v1/campaigns");
    if (!list.ok()) return make_error(Errc::unavailable, "list campaigns: " + list.summary());
    for (const auto& item : list.body.value("items", json::array())) {
      if (item.value("name", "") == regional_name) part.regional_id = item.value("id", "");
    }
    if (!part.regional_id.empty()) {
      part.create_sent_ms = 0;
      return {};
    }
    // A create sent before without a definite answer may still be running
    // there (250,000 campaign rows can outlast the region timeout): sending
    // it again would make a second campaign over the same devices, each
    // superseding the other's. It is looked for by name until the grace is over.
    if (part.create_sent_ms != 0) {
      const int64_t waited = clock_.now_unix_ms() - part.create_sent_ms;
      const int64_t grace = std::max<int64_t>(kCreateGraceMin.count(), 20 * cfg_.region_timeout.count());
      if (waited < grace) {
        return make_error(Errc::unavailable, "campaign " + regional_name + " was sent " + std::to_string(waited / 1000) +
                                                 " s ago without an answer; waiting for the region to show it");
      }
    }
  }
  auto b = bundles_(c.bundle_id, c.project);
  if (!b) return b.error();
  const std::string& envelope = b->envelope;
  // Artifacts first, so that the bundle never reaches a region whose devices
  // could not fetch what it names.
  auto env = bundles::parse_envelope(envelope);
  if (!env) return env.error();
  v1::BundleManifest m;
  if (!m.ParseFromString(env->manifest())) return make_error(Errc::internal, "bundle manifest does not parse");
  for (const auto& art : m.artifacts()) {
    const std::string sha = to_hex(art.sha256());
    const std::string local = artifacts_ ? artifacts_(sha) : "";
    if (local.empty()) continue;  // hosted elsewhere (an absolute URL): nothing to publish
    // Already there? One byte of it answers that (206), without a HEAD
    // whose empty body some clients wait for.
    RegionAnswer probe = client_.call(r, "GET", "/v1/artifacts/" + sha, "", "", {{"Range", "bytes=0-0"}});
    if (probe.reached && (probe.status == 206 || probe.status == 200)) continue;
    auto bytes = fs::read_file(local, kMaxArtifactBytes);
    if (!bytes) return bytes.error().with_context("artifact " + sha);
    RegionAnswer put = client_.call(r, "PUT", "/v1/artifacts/" + sha, *bytes, "application/octet-stream");
    audit_region("PUT", "/v1/artifacts/" + sha, r, put, "campaign " + c.id + " publishes artifact " + sha, c.project);
    if (!put.ok()) {
      return make_error(put.reached && put.status < 500 ? Errc::invalid_argument : Errc::unavailable,
                        "publish artifact " + sha + ": " + put.summary());
    }
  }
  // The bundle exactly as signed offline: its bytes, never re-signed.
  RegionAnswer up = client_.call(r, "POST", "/v1/bundles?project=" + url_encode(c.project), envelope,
                                 "application/octet-stream");
  audit_region("POST", "/v1/bundles", r, up, "campaign " + c.id + " publishes bundle " + c.bundle_id, c.project);
  if (!up.ok()) {
    // A region that refuses the bundle (bad signature for its trust, expired)
    // will refuse it again: the rollout stops rather than retrying forever.
    return make_error(up.reached && up.status < 500 ? Errc::invalid_argument : Errc::unavailable,
                      "publish bundle: " + up.summary());
  }
  const std::string regional_bundle = up.body.value("id", "");
  json body{{"name", regional_name}, {"bundle", regional_bundle}, {"selector", c.selector}};
  if (!c.strategy.is_null() && !c.strategy.empty()) body["strategy"] = c.strategy;
  RegionAnswer made = client_.call(r, "POST", "/v1/campaigns", body.dump());
  audit_region("POST", "/v1/campaigns", r, made, "campaign " + c.id + " starts in region " + r.name, c.project);
  if (!made.ok()) {
    // A refusal (400, 409) will not change by retrying: the rollout stops.
    if (made.reached && made.status < 500) {
      return make_error(Errc::invalid_argument, "region refused the campaign: " + made.summary());
    }
    // No definite answer: the region may have made it, or be making it.
    part.create_sent_ms = clock_.now_unix_ms();
    (void)store_.save_campaign(c);
    return make_error(Errc::unavailable, "create campaign: " + made.summary());
  }
  part.create_sent_ms = 0;
  part.regional_id = made.body.value("id", "");
  part.state = made.body.value("state", "");
  part.counts = made.body.value("counts", json::object());
  part.last_answer_ms = clock_.now_unix_ms();
  return {};
}

void Federation::advance(FedCampaign& c) {
  const int64_t now = clock_.now_unix_ms();
  auto regions = store_.list_regions();
  if (!regions) return;
  std::map<std::string, Region> by_name;
  for (auto& r : *regions) by_name[r.name] = r;

  // Every region reached so far reports its counts: they replace what it
  // said before, so a region that answers twice is counted once.
  for (auto& p : c.parts) {
    if (p.regional_id.empty() || regional_finished(p.state)) continue;
    auto it = by_name.find(p.region);
    if (it == by_name.end()) {
      p.reachable = false;
      p.error = "region removed from the federation";
      continue;
    }
    RegionAnswer a = client_.call(it->second, "GET", "/v1/campaigns/" + url_encode(p.regional_id));
    (void)store_.note_answer(p.region, a.reached, a.error, now);
    if (a.ok() && a.body.is_object()) {
      p.state = a.body.value("state", "");
      p.counts = a.body.value("counts", json::object());
      p.last_answer_ms = now;
      p.reachable = true;
      p.error.clear();
    } else {
      p.reachable = a.reached;
      p.error = a.summary();
    }
  }
  if (c.state != FedState::running && c.state != FedState::soaking) return;

  for (;;) {
    if (c.current_step >= static_cast<int>(c.steps.size())) break;
    const auto& step = c.steps[c.current_step];
    bool all_done = true, all_completed = true;
    for (const auto& name : step) {
      auto pit = std::find_if(c.parts.begin(), c.parts.end(), [&](const RegionPart& p) { return p.region == name; });
      if (pit == c.parts.end()) {
        c.parts.push_back(RegionPart{name, c.current_step, "", "", json::object(), 0, true, ""});
        pit = std::prev(c.parts.end());
      }
      RegionPart& part = *pit;
      if (part.regional_id.empty()) {
        auto it = by_name.find(name);
        if (it == by_name.end()) {
          c.state = FedState::stopped;
          c.state_reason = "region " + name + " was removed from the federation before its turn";
          return;
        }
        auto s = start_region(c, part, it->second);
        if (!s) {
          part.error = s.error().message;
          part.reachable = s.error().code != Errc::unavailable;
          if (s.error().code != Errc::unavailable) {
            c.state = FedState::stopped;
            c.state_reason = "region " + name + ": " + s.error().message;
            return;
          }
          all_done = false;
          all_completed = false;
          continue;
        }
        part.error.clear();
        part.reachable = true;
        (void)store_.save_campaign(c);  // the regional id is kept at once
      }
      // The region's threshold, on what it reported.
      const RegionThreshold t = c.thresholds.count(name) ? c.thresholds.at(name) : c.default_threshold;
      const int64_t failed = count_of(part.counts, "failed") + count_of(part.counts, "rollback_failed");
      const int64_t decided = failed + count_of(part.counts, "applied");
      if (decided >= t.min_sample && static_cast<double>(failed) * 100.0 > t.percent * static_cast<double>(decided)) {
        c.state = FedState::stopped;
        c.state_reason = "region " + name + " failed its threshold: " + std::to_string(failed) + " of " +
                         std::to_string(decided) + " devices failed (more than " + std::to_string(t.percent).substr(0, 5) +
                         "%); later regions were not started";
        return;
      }
      if (part.state == "paused" || part.state == "aborted" || part.state == "rolled_back") {
        c.state = FedState::stopped;
        c.state_reason = "region " + name + " campaign " + part.regional_id + " is " + part.state +
                         "; later regions were not started";
        return;
      }
      // Devices away do not hold the next region back (they converge when
      // they return), as they do not hold a wave back inside a region.
      if (part.state != "completed" && part.state != "converging") all_done = false;
      if (part.state != "completed") all_completed = false;
    }
    if (!all_done) {
      c.state = FedState::running;
      return;
    }
    const bool last = c.current_step + 1 >= static_cast<int>(c.steps.size());
    if (last) {
      // An earlier region may still have devices away (it let the next step
      // start while converging): the campaign is complete only when every
      // region is, and until then it keeps asking them all for counts.
      for (const auto& p : c.parts) all_completed = all_completed && p.state == "completed";
      if (all_completed) {
        c.state = FedState::completed;
        c.state_reason = "";
      } else {
        c.state_reason = "waiting for devices that are away";
      }
      return;
    }
    if (c.step_done_ms == 0) c.step_done_ms = now;
    if (now - c.step_done_ms < c.soak_ms) {
      c.state = FedState::soaking;
      return;
    }
    ++c.current_step;
    c.step_done_ms = 0;
    c.state = FedState::running;
  }
}

void Federation::tick() {
  std::lock_guard lock(engine_mu_);
  auto ids = store_.live_campaign_ids();
  if (!ids) {
    log::get("federation")->warn("federated campaigns: {}", ids.error().message);
    return;
  }
  for (const auto& id : *ids) {
    auto c = store_.get_campaign(id);
    if (!c || !*c) continue;
    FedCampaign camp = std::move(**c);
    const std::string before = fed_state_name(camp.state);
    advance(camp);
    camp.updated_ms = clock_.now_unix_ms();
    if (auto s = store_.save_campaign(camp); !s) {
      log::get("federation")->warn("save federated campaign={}: {}", id, s.error().message);
    }
    if (before != fed_state_name(camp.state)) {
      log::get("federation")->info("federated campaign={} state={} reason={}", id, fed_state_name(camp.state),
                                   camp.state_reason);
    }
  }
}

void Federation::start() {
  thread_ = std::thread([this] {
    std::unique_lock lock(stop_mu_);
    while (!stopping_) {
      lock.unlock();
      tick();
      lock.lock();
      stop_cv_.wait_for(lock, cfg_.poll_interval, [this] { return stopping_; });
    }
  });
}

void Federation::stop() {
  {
    std::lock_guard lock(stop_mu_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

Result<json> Federation::act(const std::string& id, const std::string& verb, const Caller& caller) {
  std::lock_guard lock(engine_mu_);
  auto got = store_.get_campaign(id);
  if (!got) return got.error();
  if (!*got || !caller.sees((*got)->project)) return make_error(Errc::not_found, "no campaign '" + id + "'");
  FedCampaign c = std::move(**got);
  const FedState s = c.state;
  const bool live = s == FedState::running || s == FedState::soaking || s == FedState::paused;
  if (verb == "pause" && !(s == FedState::running || s == FedState::soaking)) {
    return make_error(Errc::conflict, "campaign " + id + " is " + fed_state_name(s) + "; only a running campaign pauses");
  }
  if (verb == "resume" && s != FedState::paused) {
    return make_error(Errc::conflict, "campaign " + id + " is " + fed_state_name(s) + "; only a paused campaign resumes");
  }
  if (verb == "abort" && !live && s != FedState::stopped) {
    return make_error(Errc::conflict, "campaign " + id + " is already " + fed_state_name(s));
  }
  auto regions = store_.list_regions();
  if (!regions) return regions.error();
  json answers = json::array();
  for (auto& p : c.parts) {
    if (p.regional_id.empty()) continue;
    // Only what can change: a finished regional campaign is left alone
    // (rollback acts on every region that took the bundle).
    if (verb != "rollback" && regional_finished(p.state)) continue;
    if (verb == "resume" && p.state != "paused") continue;
    auto it = std::find_if(regions->begin(), regions->end(), [&](const Region& r) { return r.name == p.region; });
    if (it == regions->end()) {
      answers.push_back({{"region", p.region}, {"status", 0}, {"answer", "region removed from the federation"}});
      continue;
    }
    const std::string path = "/v1/campaigns/" + url_encode(p.regional_id) + "/" + verb;
    RegionAnswer a = client_.call(*it, "POST", path);
    audit_region("POST", path, *it, a, "campaign " + id + " " + verb + " by " + caller.token_id, c.project);
    (void)store_.note_answer(p.region, a.reached, a.error, clock_.now_unix_ms());
    if (a.ok() && a.body.is_object()) {
      p.state = a.body.value("state", p.state);
      p.counts = a.body.value("counts", p.counts);
      p.last_answer_ms = clock_.now_unix_ms();
      p.reachable = true;
    }
    answers.push_back({{"region", p.region}, {"status", a.reached ? a.status : 0}, {"answer", a.summary()}});
  }
  if (verb == "pause") c.state = FedState::paused;
  if (verb == "resume") c.state = FedState::running;
  if (verb == "abort" || verb == "rollback") {
    c.state = FedState::aborted;
    c.state_reason = verb == "rollback" ? "rolled back by " + caller.token_id : "aborted by " + caller.token_id;
  }
  if (verb == "pause") c.state_reason = "paused by " + caller.token_id;
  if (verb == "resume") c.state_reason.clear();
  c.updated_ms = clock_.now_unix_ms();
  if (auto st = store_.save_campaign(c); !st) return st.error();
  json out = campaign_json(c);
  out["answers"] = answers;
  return out;
}

json Federation::campaign_json(const FedCampaign& c) const {
  static const char* kCountKeys[] = {"total",        "waiting",     "pending",  "in_progress",  "applied",
                                     "failed",       "superseded",  "skipped",  "rolling_back", "rolled_back",
                                     "rollback_failed", "offline"};
  json sum = json::object();
  for (const char* k : kCountKeys) sum[k] = 0;
  int64_t total = 0;
  for (const auto& p : c.parts) total += count_of(p.counts, "total");
  json regions = json::array();
  for (const auto& p : c.parts) {
    for (const char* k : kCountKeys) sum[k] = sum[k].get<int64_t>() + count_of(p.counts, k);
    const int64_t n = count_of(p.counts, "total");
    regions.push_back({{"region", p.region},
                       {"step", p.step},
                       {"regional_campaign", p.regional_id},
                       {"state", p.state},
                       {"reachable", p.reachable},
                       {"counts", p.counts},
                       {"share", total > 0 ? static_cast<double>(n) / static_cast<double>(total) : 0.0},
                       {"last_answer_at", iso_ms(p.last_answer_ms)},
                       {"error", p.error}});
  }
  json thresholds = json::object();
  for (const auto& [r, t] : c.thresholds) thresholds[r] = {{"percent", t.percent}, {"min_sample", t.min_sample}};
  json steps = json::array();
  for (size_t i = 0; i < c.steps.size(); ++i) {
    const std::string state = static_cast<int>(i) < c.current_step ? "done"
                              : static_cast<int>(i) == c.current_step
                                  ? (c.state == FedState::completed ? "done" : "current")
                                  : "next";
    steps.push_back({{"index", i}, {"regions", c.steps[i]}, {"state", state}});
  }
  return {{"id", c.id},
          {"kind", "federation"},
          {"name", c.name},
          {"project", c.project},
          {"bundle", {{"id", c.bundle_id}, {"name", c.bundle_name}, {"version", c.bundle_version}}},
          {"selector", c.selector},
          {"strategy", c.strategy},
          {"state", fed_state_name(c.state)},
          {"state_reason", c.state_reason},
          {"steps", steps},
          {"current_step", c.current_step},
          {"soak", std::to_string(c.soak_ms) + "ms"},
          {"default_threshold", {{"percent", c.default_threshold.percent}, {"min_sample", c.default_threshold.min_sample}}},
          {"thresholds", thresholds},
          {"counts", sum},
          {"regions", regions},
          {"created_at", iso_ms(c.created_ms)},
          {"updated_at", iso_ms(c.updated_ms)},
          {"waves", json::array()}};
}

}  // namespace flotilla::hub::federation
