#pragma once
// The federation role (docs/adr/0015-federation-of-regional-hubs.md):
// `flotilla-hub --role federation` fronts several regional hubs and talks to
// them only through their public REST API over HTTPS, each verified against
// the region's own CA. It keeps its own SQLite (regions, federated campaigns)
// next to a hub store for its tokens, audit and bundles, which the existing
// access code serves.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/common/clock.hpp"
#include "flotilla/common/options.hpp"
#include "flotilla/common/result.hpp"
#include "flotilla/common/sqlite.hpp"
#include "flotilla/hub/api.hpp"

namespace flotilla::hub {
struct HubConfig;
}

namespace flotilla::hub::federation {

using nlohmann::json;

// Settings of the federation role (flag, FLOTILLA_HUB_... and config key).
struct FederationConfig {
  // Every request to a region has this deadline; a fan-out waits at most this
  // long for all regions together (they are asked in parallel).
  std::chrono::milliseconds region_timeout{5000};
  // How often a running federated campaign asks its regions for status.
  std::chrono::milliseconds poll_interval{2000};
};
void add_federation_options(Options& o);
Result<FederationConfig> federation_config_from(const Options& o);

// A regional hub as the federation knows it. token is the secret the region
// issued (an operator token of project "*"): kept in the federation's
// database (mode 0600), never logged, never returned by the API.
struct Region {
  std::string name;
  std::string url;     // https://host:port of the region's REST API
  std::string ca_pem;  // the CA the region's TLS certificate must chain to
  std::string token;
  int64_t created_ms = 0;
  // The last time the region answered, and whether the last attempt did.
  std::string state = "unknown";  // ok | unreachable | unknown (never asked)
  int64_t last_answer_ms = 0;
  std::string error;
};

// One region's part of a federated campaign: its regional campaign, the
// counts it last reported (replaced, never added to) and when.
struct RegionPart {
  std::string region;
  int step = 0;
  std::string regional_id;  // empty until created at the region
  std::string state;        // the regional campaign's state as last reported ("" before)
  json counts = json::object();
  int64_t last_answer_ms = 0;
  bool reachable = true;
  std::string error;
  // When a create was sent without a definite answer (a timeout, a 5xx): the
  // region may be making it still, so it is looked for by name and not sent
  // again until Federation::kCreateGraceMin (or 20 region timeouts) passed.
  int64_t create_sent_ms = 0;
};

enum class FedState { running, soaking, paused, stopped, aborted, completed };
std::string fed_state_name(FedState s);
std::optional<FedState> parse_fed_state(const std::string& s);

// The failure threshold a region must stay within before the next step
// starts: failed / (applied + failed) above percent, once at least
// min_sample devices have an outcome, stops the rollout.
struct RegionThreshold {
  double percent = 10;
  int64_t min_sample = 1;
};

struct FedCampaign {
  std::string id;
  std::string name;
  std::string project;
  std::string bundle_id;  // the federation's bundle id
  std::string bundle_name;
  uint64_t bundle_version = 0;
  std::string selector;
  json strategy = json::object();  // given to every regional campaign as is
  std::vector<std::vector<std::string>> steps;  // order of regions (groups run together)
  std::map<std::string, RegionThreshold> thresholds;  // per region; default_threshold otherwise
  RegionThreshold default_threshold;
  int64_t soak_ms = 0;
  FedState state = FedState::running;
  std::string state_reason;
  int current_step = 0;
  int64_t step_done_ms = 0;  // when the current step's regions all succeeded (soak start)
  int64_t created_ms = 0;
  int64_t updated_ms = 0;
  std::vector<RegionPart> parts;  // one per region of every step started so far
};

// The federation's own SQLite: regions and federated campaigns.
class FederationStore {
 public:
  static Result<std::unique_ptr<FederationStore>> open(const std::string& path);

  Status add_region(const Region& r);  // already_exists if the name is taken
  Result<std::vector<Region>> list_regions();
  Result<std::optional<Region>> get_region(const std::string& name);
  Result<bool> remove_region(const std::string& name);
  Status note_answer(const std::string& name, bool ok, const std::string& error, int64_t now_ms);
  // The last list of campaigns a region answered (kept so that a region
  // away shows what it last said, marked stale).
  Status keep_campaign_list(const std::string& name, const json& items);
  Result<json> last_campaign_list(const std::string& name);

  Status save_campaign(const FedCampaign& c);  // insert or replace, parts included
  Result<std::optional<FedCampaign>> get_campaign(const std::string& id);
  Result<std::vector<FedCampaign>> list_campaigns();
  // Campaigns still in progress (running, soaking, paused).
  Result<std::vector<std::string>> live_campaign_ids();

 private:
  explicit FederationStore(std::unique_ptr<sql::Db> db) : db_(std::move(db)) {}
  std::mutex mu_;
  std::unique_ptr<sql::Db> db_;
};

// A region's answer to one request.
struct RegionAnswer {
  bool reached = false;  // false: network, TLS or timeout; error says which
  int status = 0;
  json body;             // parsed JSON (null if not JSON)
  std::string error;     // a safe message: never the token
  bool ok() const { return reached && status >= 200 && status < 300; }
  // "201", "unreachable: ...", "409 conflict: ..." — what audit rows record.
  std::string summary() const;
};

// Talks to a region: HTTPS only, chain and host name verified against the
// region's CA, with a deadline; the token goes only in the Authorization header.
class RegionClient {
 public:
  RegionClient(std::filesystem::path ca_dir, std::chrono::milliseconds timeout)
      : ca_dir_(std::move(ca_dir)), timeout_(timeout) {}
  RegionAnswer call(const Region& r, const std::string& method, const std::string& path, const std::string& body = "",
                    const std::string& content_type = "application/json",
                    const std::map<std::string, std::string>& headers = {}) const;
  // Writes the region's CA to a file (http::Request reads CAs from files).
  Result<std::string> ca_file(const Region& r) const;
  std::chrono::milliseconds timeout() const { return timeout_; }

 private:
  std::filesystem::path ca_dir_;
  std::chrono::milliseconds timeout_;
};

// A region name: 1..63 of [a-z0-9-], starting with a letter or digit.
bool valid_region_name(const std::string& name);

// The federation: regions, fan-out reads and the campaign engine. Pure
// request handlers over it live in FederationApi.
class Federation {
 public:
  // audit(record) appends to the federation's audit log (HubService).
  using AuditSink = std::function<void(AuditRecord)>;
  // One of the federation's bundles as a caller of `project` may see it
  // (not_found otherwise), and the path of an artifact the federation holds
  // (empty if it holds none by that hash).
  using BundleSource = std::function<Result<BundleRecord>(const std::string& bundle_id, const std::string& project)>;
  using ArtifactSource = std::function<std::string(const std::string& sha256)>;
  // The least time a regional campaign create sent without a definite answer
  // is waited for (looked up by name) before it is sent again.
  static constexpr std::chrono::milliseconds kCreateGraceMin{120000};

  Federation(FederationStore& store, const Clock& clock, FederationConfig cfg, std::filesystem::path ca_dir,
             AuditSink audit, BundleSource bundles, ArtifactSource artifacts);
  ~Federation();

  FederationStore& store() { return store_; }
  const RegionClient& client() const { return client_; }
  const Clock& clock() const { return clock_; }
  const FederationConfig& config() const { return cfg_; }

  // Checks a region before it is stored: https URL, the CA parses and the
  // region's certificate verifies against it, the token is an operator
  // token of project "*" at that region. Nothing is stored on any failure.
  Result<Region> add_region(Region r);

  // Asks every region (or only `only`) the same GET in parallel, within the
  // deadline; notes each region's answer. Unknown `only` is not_found.
  struct FanOut {
    Region region;
    RegionAnswer answer;
  };
  Result<std::vector<FanOut>> fan_out(const std::string& path_for_all,
                                      const std::function<std::string(const Region&)>& path_of,
                                      const std::string& only);
  json region_status(const Region& r) const;

  // Federated campaigns.
  Result<FedCampaign> create_campaign(FedCampaign c, const Caller& caller);
  // pause, resume, abort, rollback: fanned out to every region the campaign
  // has reached, each region's answer audited; returns the per-region answers.
  Result<json> act(const std::string& id, const std::string& verb, const Caller& caller);
  json campaign_json(const FedCampaign& c) const;

  // One pass of the engine over every live campaign (the thread calls it;
  // tests may too).
  void tick();
  void start();
  void stop();

 private:
  void advance(FedCampaign& c);
  Status start_region(FedCampaign& c, RegionPart& part, const Region& r);
  void audit_region(const std::string& method, const std::string& path, const Region& r, const RegionAnswer& a,
                    const std::string& detail, const std::string& project);

  FederationStore& store_;
  const Clock& clock_;
  FederationConfig cfg_;
  RegionClient client_;
  AuditSink audit_;
  BundleSource bundles_;
  ArtifactSource artifacts_;
  std::mutex engine_mu_;  // one tick or action at a time per federation
  std::thread thread_;
  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;
};

// The federation's REST front: /v1/regions, /v1/devices, /v1/campaigns are
// answered here; tokens, audit, whoami, bundles and artifacts by the hub's
// own Api over the federation's hub store; every other route is 404.
class FederationApi {
 public:
  FederationApi(Federation& fed, Api& api, HubService& service) : fed_(fed), api_(api), service_(service) {}
  HttpResponse handle(const HttpRequest& req);
  Admission admit(const HttpRequest& req);
  std::optional<HttpResponse> precheck_upload(const HttpRequest& req) { return api_.precheck_upload(req); }

 private:
  Federation& fed_;
  Api& api_;
  HubService& service_;
};

// Every (method, path pattern) FederationApi answers itself, for docs and tests.
std::vector<std::pair<std::string, std::string>> federation_routes();

// Runs the federation role until *stop (app.cpp calls it for --role federation).
Status run_federation(const HubConfig& cfg, const FederationConfig& fcfg, const std::atomic<bool>& stop);

}  // namespace flotilla::hub::federation
