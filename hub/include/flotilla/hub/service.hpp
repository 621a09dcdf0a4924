#pragma once
// The hub's core: enrollment, bundles, campaigns, and the MQTT side that
// publishes desired state and folds device reports into the store.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/result.hpp"
#include "flotilla/common/transport.hpp"
#include "flotilla/hub/campaign.hpp"
#include "flotilla/hub/campaign_board.hpp"
#include "flotilla/hub/cell.hpp"
#include "flotilla/hub/control_log.hpp"
#include "flotilla/hub/group_commit.hpp"
#include "flotilla/hub/metrics.hpp"
#include "flotilla/hub/rate_limit.hpp"
#include "flotilla/hub/store.hpp"
#include "flotilla/v1/bundle.pb.h"
#include "flotilla/v1/enroll.pb.h"
#include "flotilla/v1/report.pb.h"

namespace flotilla::hub {

class EmbeddedBroker;
class ArtifactStore;
class DeviceCa;
struct ApplyRequest;
struct ApplyScope;
struct ApplyOutcome;
class AggregateStore;

struct ServiceConfig {
  // Signs the per-device header of every desired state (the "director" key,
  // docs/adr/0009-director-signed-desired-state.md); its public half goes to
  // devices at enrollment. Unset: an ephemeral key (tests, embedders).
  std::optional<bundles::KeyPair> director_key;
  std::string broker_url;            // what devices are told to connect to
  // One broker URL per cell (docs/architecture.md, "Cells"), as devices are
  // told it; empty = one cell whose devices are told broker_url.
  std::vector<std::string> cell_broker_urls;
  std::string public_url;            // the hub's REST base URL as devices see it
  bool manage_broker_credentials = true;  // false with an external broker
  // Issues each device with its own broker session a client certificate
  // from its certificate request (enrollment, renewal); null = none.
  const DeviceCa* device_ca = nullptr;
  int64_t cert_lifetime_s = int64_t{90} * 86400;
  // The embedded broker takes passwords, not certificates (development,
  // plain MQTT): enrollment issues a password, which rewrites the broker's
  // password file; there is nothing to renew.
  bool broker_passwords = false;
  // What devices are told to trust for the broker's own certificate
  // (EnrollResponse.ca_certificates): the device CA bundle, plus the
  // operator's broker CA when there is one.
  std::string ca_certificates;
  size_t report_queue_cap = 100000;
  // The queue also stops at this many payload bytes: a gateway's batch
  // carries up to 1,000 reports in one message.
  size_t report_queue_bytes_cap = 64u << 20;
  // Tests that drive the engine with a fake clock call tick() themselves.
  bool engine_thread = true;
  // Several hub processes (docs/adr/0016): every control write goes through
  // the control log in this coordinator, the store being a mirror of it, and
  // a watcher applies the other hubs' entries. Null (one hub, the default):
  // nothing changes.
  coord::Coordinator* control_coordinator = nullptr;
  ControlLogOptions control_log;
  // Campaigns across cells (campaign_board.hpp, docs/adr/0017): the
  // coordinator on which this hub claims its cells, publishes their counts
  // and elects the one campaign leader. Null: the engine counts every cell
  // itself and decides (unit tests, embedders).
  coord::Coordinator* coordinator = nullptr;
  // This hub process among those sharing the coordinator (unique to it and
  // stable across its restarts: it takes its own keys back at start).
  std::string coord_holder = "hub";
  std::chrono::seconds coord_ttl{10};  // the cell and leader leases
  // The cells it claims; empty = every cell it runs.
  std::vector<int> claim_cells;
  // Several hub processes share one set of cells whose brokers run on their
  // own (--cell-broker; docs/operations.md, "Several hub processes"): each
  // hub takes at most ceil(cells / live hubs) of them (and any orphaned
  // one), serves only those, and on taking one over rebuilds its device
  // and membership rows from the roll call and the control log. claim_cells
  // is ignored then.
  bool share_cells = false;
  // share_cells: PEM CAs that sign the other hub processes' REST
  // certificates (their https public URLs); empty = the system store.
  std::string peer_ca_file;
  // Move requests (and withdrawals) per engine tick at most
  // (HubService::kMoveChunk; tests make it small).
  int64_t move_chunk = 2000;
  // Each cell's device rows in a file of its own (ADR 18 slice 7):
  // cell_files[i] is cell i's (Store::open_cell), owned by the caller, one
  // per cell; hub.db then holds the directory and the control data. Empty
  // (the default): every cell's rows are in hub.db. Not offered on the
  // command line yet: the API's reads (device pages, views, /metrics) and
  // hub processes sharing cells still read hub.db only.
  std::vector<Store*> cell_files;
};

// A campaign's stored strategy (the defaults for one that does not parse).
Strategy strategy_of(const CampaignRecord& c);

// Device counts by campaign status. offline = unfinished devices that are
// offline right now (they neither stall nor fail a wave).
struct CampaignCounts {
  int64_t total = 0, waiting = 0, pending = 0, in_progress = 0, applied = 0, failed = 0, superseded = 0,
          skipped = 0, rolling_back = 0, rolled_back = 0, rollback_failed = 0, offline = 0;
  void add(const std::string& status, int64_t n);
};

// One cell's share of a campaign (GET /v1/campaigns/{id} "cells"): counted
// here for the cells this hub owns, as last published for the others.
using CellCountsView = CellCampaignCounts;

struct WaveView {
  int index = 0;
  std::string name;
  CampaignCounts counts;
};

struct CampaignView {
  CampaignRecord campaign;
  BundleRecord bundle;
  Strategy strategy;
  CampaignCounts counts;
  std::vector<WaveView> waves;
  std::vector<CampaignDeviceRecord> devices;
  std::vector<std::string> away;  // unfinished and offline (first 100)
  std::map<std::string, int64_t> failure_reasons;
  std::vector<CellCountsView> cells;  // by cell
};

struct CreatedToken {
  TokenRecord record;
  std::string secret;  // shown once
};

class HubService {
 public:
  HubService(Store& store, const Clock& clock, ServiceConfig cfg);
  ~HubService();

  // The MQTT side. The transport must already be connected with the hub's credential.
  // With one cell, cell 0's session.
  Status attach_transport(transport::Transport& t) { return attach_transport(0, t); }
  Status attach_transport(int cell, transport::Transport& t);
  const Clock& clock() const { return clock_; }
  void set_broker(EmbeddedBroker* broker) { set_cell_broker(0, broker); }
  void set_cell_broker(int cell, EmbeddedBroker* broker);

  // Cells (docs/architecture.md, "Cells"): how many, and each one.
  int cell_count() const { return static_cast<int>(cells_.size()); }
  Cell& cell(int id) { return *cells_.at(static_cast<size_t>(id)); }
  struct CellView {
    int id = 0;
    std::string broker_url;
    std::string broker_state;  // up, restarting, external
    bool draining = false;
    int64_t devices_total = 0, devices_online = 0;  // of the project asked for
  };
  // Every cell, with device counts of project ("*": all projects).
  Result<std::vector<CellView>> list_cells(const std::string& project = "*");
  // Drains a cell (flotilla cell drain): no new enrollments there, and the
  // engine tells each of its devices (and gateways, with their devices) to
  // move to the least loaded other cell, in a director-signed desired state
  // (DesiredHeader.broker_url). A device's cell changes when it speaks from
  // its new cell's broker. Refused (conflict) for the last undrained cell.
  // Repeating it changes nothing and answers the progress. With shared
  // cells any process takes it: the draining set is in the coordinator, the
  // holder of the cell asks its devices to move, and the holder of the cell
  // each arrives in records the move (docs/adr/0019).
  struct DrainProgress {
    int cell = 0;
    bool draining = false;
    int64_t moved = 0;      // devices that left the cell since the hub started
    int64_t remaining = 0;  // devices still in it (every project)
  };
  Result<DrainProgress> drain_cell_devices(int cell);
  // Stops a drain (DELETE /v1/cells/{id}/drain): the cell takes enrollments
  // again, its devices are no longer asked to move, and the moves it asked
  // for that were not taken are withdrawn. Devices that already left stay
  // where they went. A cell that is not draining: nothing changes.
  Result<DrainProgress> undrain_cell(int cell);
  // After a drain stops, devices that took a move before they saw it still
  // arrive: for this long they are let in (and anything from a draining cell).
  static constexpr int64_t kUndrainGraceMs = 10 * 60 * 1000;
  // How long a device asked to move has before it is asked again.
  static constexpr int64_t kMoveRetryMs = 30000;
  static constexpr int64_t kMoveChunk = 2000;  // move requests per engine tick at most (the default)
  void set_artifacts(ArtifactStore* a) { artifacts_ = a; }
  ArtifactStore* artifacts() const { return artifacts_; }
  // The dashboard's read models (aggregates.hpp); the /v1/views routes
  // answer 503 without them.
  void set_aggregates(AggregateStore* a) { aggregates_ = a; }
  AggregateStore* aggregates() const { return aggregates_; }
  // Where the API reads what it must not wait for the store's writer to
  // read (tokens, device pages, /metrics): the read models' connections when
  // set, else read connections of the hub's own, opened on first use. Null
  // only for a store without a file.
  AggregateStore* reads();
  // f(store) on one of those read connections, as a Store that cannot write
  // (the writer's store under store_mu_ when there are none); returns what f
  // returns. For API reads only: it sees what is committed, so nothing that
  // runs inside a write transaction may read through it.
  template <class F>
  auto read(F&& f) -> decltype(f(std::declval<Store&>())) {
    std::optional<decltype(f(std::declval<Store&>()))> out;
    read_store([&](Store& s) { out.emplace(f(s)); });
    return std::move(*out);
  }
  void read_store(const std::function<void(Store&)>& f);
  void stop();

  // With ServiceConfig::control_coordinator: the control log (null without
  // one), and whether it could be set up (the hub refuses to start if not).
  ControlLog* control_log() const { return control_log_.get(); }
  Status control_log_status() const { return control_log_status_; }

  // Tokens. kind is "api" or "enroll". A positive ttl sets the expiry from
  // the service's clock.
  Result<CreatedToken> create_token(const std::string& kind, TokenRecord rec,
                                    std::chrono::milliseconds ttl = std::chrono::milliseconds(0));
  Result<std::optional<TokenRecord>> authenticate(const std::string& kind, const std::string& secret);

  // With audit, the request's audit record is written in the enrollment's
  // own transaction (audit->stored then says so): the store commits control
  // writes with synchronous=FULL, and a second commit for the audit row was
  // the larger half of an enrollment's cost (docs/scale.md).
  Result<v1::EnrollResponse> enroll(const v1::EnrollRequest& req, AuditRecord* audit = nullptr);
  // Up to kMaxEnrollBatch devices behind one gateway, under one token and one
  // gateway signature. The request as a whole is refused only for what
  // concerns all of it (token, gateway, its proof, the size); otherwise each
  // device gets its own result, and the ones that pass are stored together.
  static constexpr size_t kMaxEnrollBatch = 1000;
  // A gateway's report batch (v1::GatewayReports); a larger one is dropped whole.
  static constexpr int kMaxGatewayReports = 1000;
  static constexpr size_t kMaxGatewayReportBytes = 1u << 20;
  // The largest report and presence message a device may send; a larger one
  // is dropped before it is queued (a report is a few hundred bytes).
  static constexpr size_t kMaxReportBytes = 256u << 10;
  static constexpr size_t kMaxPresenceBytes = 4u << 10;
  Result<v1::EnrollBatchResponse> enroll_batch(const v1::EnrollBatchRequest& req);
  // A new broker certificate for an enrolled device that proves it holds its
  // identity key (the old certificate may have expired). Refused for a
  // decommissioned device, a device behind a gateway, a replayed request.
  // A device that still had a password moves to certificates here.
  Result<v1::RenewResponse> renew(const v1::RenewRequest& req);
  // Rebuilds the revocation list from the store and has the broker load it
  // (after a decommission revoked certificates; at start); concurrent
  // callers share one reload.
  Status sync_broker_revocations();
  // Periodic upkeep (the hub calls it every few minutes): forgets expired
  // certificates and refreshes the revocation list before it runs out.
  void maintain_certificates();
  // The revocation list(s) as the broker has them (PEM; empty without a CA).
  std::string crl_pem() const;
  // How long a revocation list is valid; the hub makes the next one when 20
  // days are left (an external broker that fetches it daily never holds an
  // expired one; the embedded broker reloads for it every ten days).
  static constexpr int64_t kCrlValiditySeconds = int64_t{30} * 86400;
  // The list the broker was started with, valid until next_update (unix s).
  void loaded_crl(std::string pem, int64_t next_update) {
    std::lock_guard lock(crl_mu_);
    crl_pem_ = std::move(pem);
    crl_next_update_ = next_update;
  }
  // The device CA bundle (PEM; empty without a CA): what a broker trusts
  // for devices' client certificates.
  std::string device_ca_pem() const;

  // Stores a signed bundle after checking it parses and is signed. Returns the
  // existing record for a byte-identical manifest.
  Result<std::pair<BundleRecord, bool>> upload_bundle(const std::string& envelope_bytes,
                                                      const std::string& project = "default");
  // Scoped to project ("*": every project; see Store::get_bundle).
  Result<std::vector<BundleRecord>> list_bundles(const std::string& project = "*");
  Result<std::optional<BundleRecord>> get_bundle(const std::string& key, const std::string& project = "*");

  // Campaigns (campaign_engine.cpp). A campaign belongs to its bundle's
  // project and targets the devices of that project that match the
  // selector, in waves. project is the caller's: it must see the bundle.
  // An empty id makes a random one; declarative apply passes its own
  // (declared_campaign_id) so a dry run predicts the waves exactly.
  Result<CampaignRecord> create_campaign(const std::string& name, const std::string& bundle_key,
                                         const std::string& selector, const Strategy& strategy = {},
                                         const std::string& project = "*", const std::string& campaign_id = "");
  // What create_campaign makes, before anything is written: the record and
  // each member's row (rank, wave, zone, cell). Declarative apply plans
  // inside its control write; its dry run counts devices per wave from the
  // plan and so writes no device store (ADR 18).
  struct CampaignPlan {
    CampaignRecord record;
    std::vector<CampaignMember> members;
    // Devices per wave, wave_count long (members of an unknown wave, none
    // today, are left out).
    std::vector<int64_t> per_wave(int wave_count) const;
  };
  Result<CampaignPlan> plan_campaign(const std::string& name, const std::string& bundle_key,
                                     const std::string& selector, const Strategy& strategy = {},
                                     const std::string& project = "*", const std::string& campaign_id = "");
  // Writes a plan made in the same control write: the record, then each
  // member's row in the store of its cell.
  Status write_campaign(const CampaignPlan& plan);
  // A campaign's counts by wave, status and presence over every cell, as
  // its view adds them up: this hub's cells counted now, other hubs' cells
  // as they published them.
  Result<std::vector<CampaignCountRow>> campaign_counts(const std::string& id);
  // The rows campaign c gives these devices, found by id without a scan of
  // the fleet: each one's rank, wave and zone exactly as at the campaign's
  // creation (campaign_members). A count-based canary's cutoff (the Nth
  // lowest rank of the matching devices) takes one scan, once per campaign
  // in this process. Unknown ids and devices the campaign does not target
  // (another project, decommissioned, not matching) are left out.
  Result<std::vector<CampaignMember>> members_by_id(const CampaignRecord& c,
                                                           const std::vector<std::string>& ids);
  Result<std::optional<CampaignView>> campaign_view(const std::string& id, bool with_devices);
  Result<std::vector<CampaignView>> list_campaigns(const std::string& project = "*");
  // pause, resume, abort, rollback or approve (the next wave, at a gate).
  Result<CampaignRecord> campaign_action(const std::string& id, const std::string& action);
  // One step of the engine: first the decisions (failure threshold, waves,
  // completion, the release budget) in one control write, then what they
  // imply in the stores of the cells this hub owns (deadlines, release,
  // abort and rollback of their devices). The engine thread calls it; tests
  // too. Decisions on the totals only by the campaign leader
  // (docs/architecture.md, "Campaigns" and "Campaigns across cells").
  void tick();
  // This hub decides for every campaign (flotilla_campaign_leader).
  bool campaign_leader() const { return leader_.load(); }
  // The cells this hub owns now, ascending.
  std::vector<int> owned_cells() const;
  // Whether this hub connects to the cell's broker and serves its devices:
  // every cell, unless hubs share the cells (then the ones it holds by
  // lease). Never waits for the coordinator.
  bool shares_cells() const { return cfg_.share_cells; }
  const std::string& peer_ca_file() const { return cfg_.peer_ca_file; }
  // share_cells: the REST base URL of the hub process that holds `cell` now,
  // as it announced itself; empty when none does (the cell is between
  // owners) or the coordinator cannot say. Two coordinator reads.
  std::string cell_owner_url(int cell);
  // The same for every cell another hub holds (cell -> URL), in two
  // coordinator reads whatever the number of cells: what a device page,
  // which may touch every cell, asks once.
  std::map<int, std::string> cell_owner_urls();
  bool serves_cell(int cell) const {
    return !cfg_.share_cells || (cell >= 0 && cell < 64 && ((served_mask_.load() >> cell) & 1u));
  }

  Result<std::optional<DeviceRecord>> get_device(const std::string& id);

  // Access control, devices and audit (service_access.cpp).
  Result<std::vector<TokenRecord>> list_tokens(const std::string& kind);
  Result<std::optional<TokenRecord>> get_token(const std::string& kind, const std::string& id);
  Status revoke_token(const std::string& kind, const std::string& id);
  // Sets (value) or removes (nullopt) labels; all are validated before any is applied.
  Result<DeviceRecord> edit_device_labels(const std::string& id,
                                          const std::map<std::string, std::optional<std::string>>& changes);
  // Removes the device's broker credential (the broker reloads and drops it),
  // clears its retained desired state and keeps its row as "decommissioned".
  Result<DeviceRecord> decommission_device(const std::string& id);
  // Brings the broker's password file up to date with the store (after a
  // committed credential change); concurrent callers share one rewrite.
  Status sync_broker_credentials();
  // Called once a device is decommissioned, without store_mu_ held: the
  // campaign engine settles the device's unfinished campaign rows here.
  void on_device_decommissioned(const std::string& device_id);
  Status append_audit(AuditRecord a);
  // The trust message attached to every desired state (service_trust.cpp).
  // put_trust parses and checks each keyring's shape (not the chain: devices
  // do that) and refuses anything else with invalid_argument.
  Result<v1::Trust> put_trust(const std::string& trust_bytes);
  Result<std::optional<v1::Trust>> get_trust();
  Result<std::vector<AuditRecord>> list_audit(int64_t after, int64_t limit, const std::string& project);

  // Declarative apply (service_apply.cpp): checks every document against the
  // store and applies them all, with pruning, in one transaction; a dry run
  // rolls that transaction back, so it answers exactly what would happen.
  Result<ApplyOutcome> apply(const ApplyRequest& req, const ApplyScope& scope);
  Result<std::vector<AppliedObject>> list_applied(const std::string& apply_set, bool all_sets);
  Result<std::vector<CampaignDeviceRecord>> campaign_failures(const std::string& campaign_id, int64_t limit);
  // GitRepos: created and changed by REST, the CLI or apply; Git sync
  // (gitsync.cpp) reads them and records where each sync stands.
  Result<GitRepoRecord> put_gitrepo(GitRepoRecord r, bool create_only);
  Result<std::optional<GitRepoRecord>> get_gitrepo(const std::string& name);
  Result<std::vector<GitRepoRecord>> list_gitrepos();
  Status delete_gitrepo(const std::string& name);
  Status save_gitrepo_status(const GitRepoRecord& r);
  // Asks Git sync to poll a repository now (no-op without Git sync).
  void set_git_sync_trigger(std::function<void(const std::string&)> f) { git_sync_trigger_ = std::move(f); }
  void request_git_sync(const std::string& name) {
    if (git_sync_trigger_) git_sync_trigger_(name);
  }
  bool git_sync_enabled() const { return static_cast<bool>(git_sync_trigger_); }

  // Observability (read by /metrics).
  struct MqttCounters {
    uint64_t reports_received = 0, presence_received = 0, other_received = 0, gateway_batches_received = 0;
    uint64_t reports_processed = 0, presence_processed = 0;
    uint64_t desired_published = 0, desired_publish_failures = 0;
    uint64_t dropped_too_large = 0, log_lines_suppressed = 0;
    uint64_t dropped_decommissioned = 0;
    uint64_t certificates_issued = 0, renewals = 0, broker_reloads = 0;
    uint64_t broker_restarts = 0, presence_resets = 0, rollcalls = 0, stale_presence_ignored = 0;
  };
  MqttCounters mqtt_counters() const;
  // After a new broker session, answers to the roll call may still be on
  // their way this long after its spread.
  static constexpr int64_t kPresenceSettleMarginMs = 5000;
  size_t queue_depth();
  size_t queue_capacity() const { return cfg_.report_queue_cap; }
  const Histogram& report_commit_seconds() const { return report_commit_seconds_; }

  // Entry point for messages from the broker (any thread); queued for the worker.
  void on_message(transport::Message&& msg) { on_message(0, std::move(msg)); }
  void on_message(int cell, transport::Message&& msg);
  // Processes everything queued so far (the worker does this continuously;
  // unit tests call it directly).
  void drain();

  // True once subscribed to device reports: before that, enrolling devices
  // would report into the void.
  bool mqtt_connected() const;
  void mark_detached() {
    for (auto& c : cells_) c->set_attached(false);
  }
  void mark_detached(int cell) { cells_.at(static_cast<size_t>(cell))->set_attached(false); }
  // The hub's session to a cell's broker ended (the broker died or cannot be
  // reached): its devices are offline until they re-announce on the next one.
  void lost_broker_session(int cell);
  // Messages from a device on a broker that is not its cell's, dropped (it
  // left that cell; a late message from there must not bring it back).
  uint64_t other_cell_dropped() const { return other_cell_dropped_.load(); }
  // The public half of the director key, as devices receive it at enrollment.
  const bundles::PublicKey& director_public_key() const { return cfg_.director_key->pub; }
  uint64_t reports_processed() const { return reports_processed_; }

 private:
  // Enrollment steps shared by enroll() and enroll_batch().
  Result<TokenRecord> usable_enrollment_token(const std::string& secret);
  Result<flotilla::Bytes> gateway_identity(const std::string& gateway_id, const std::string& project);
  // *cell: the cell of the device's existing row, -1 for a new device.
  Status check_reenrollment(const DeviceRecord& d, int* cell = nullptr);  // store_mu_ held
  // The cell a new device joins (store_mu_ held): its gateway's, else the
  // undrained cell with the fewest devices.
  Result<int> cell_for_new_device(const DeviceRecord& d);
  const std::string& cell_broker_url(int cell) const;
  // The undrained cell with the fewest devices (-1: none); counts as given.
  int least_loaded_cell(const std::vector<int64_t>& counts, int except) const;
  void continue_drains();
  // After a device moved in: its pending desired state goes out on its new
  // cell, and the retained one on the old broker is cleared.
  void settle_moves();
  std::vector<std::pair<std::string, int>> moved_in_;  // (device or gateway, old cell), store_mu_
  // A device (a gateway with its devices: `rows`) now in cell `to`: counts,
  // counters, moved_in_ for settle_moves, and the log line (store_mu_ held).
  void note_moved(const std::string& owner, int from, int to, int64_t rows, std::string_view how);
  // Hub processes sharing cells (docs/adr/0019): every process must agree
  // which cell a device is in, so an arrival from a draining cell is
  // written by record_arrivals as one control write, outside the report
  // batch that saw it; until then its rows stay in the old cell. Then the
  // arrivals get the rows of running campaigns the old holder had made.
  static constexpr const char* kDrainsPrefix = "/flotilla/drains/";
  std::map<std::string, std::pair<int, int>> pending_arrivals_;  // owner -> (from, to), store_mu_
  bool follow_pending_ = false;  // a report batch moved a device: follow_directory after it commits; store_mu_
  int64_t arrivals_retry_ms_ = 0;                                // store_mu_
  static constexpr int64_t kArrivalsRetryMs = 5000;
  std::atomic<bool> recording_arrivals_{false};
  // The cells in the coordinator's draining set -> the revision at which
  // each drain began (its key's create revision).
  Result<std::map<int, int64_t>> shared_drains();
  void record_arrivals();
  void clear_moved_away();
  // Deletes a device's retained desired state on a cell's broker (an empty
  // retained message); false when the hub has no session to it.
  bool clear_retained_desired(int cell, const std::string& id);
  void add_arrival_members(const std::vector<std::string>& owners);  // store_mu_ held
  // The shared draining set (/flotilla/drains/<cell>) onto the cells' flags.
  void follow_drains(const std::function<void(const std::string&, const Error&)>& warn);
  std::map<std::string, int64_t> move_asked_ms_;        // store_mu_
  // A cell's drain stopped: its flag now; the engine's next continue_drains
  // withdraws the moves this process asked for there. Takes no store lock
  // (coordinate() calls it holding coord_mu_, which nests inside store_mu_).
  void stop_drain(Cell& c, std::string_view why);
  std::mutex drains_stopped_mu_;
  std::set<int> drains_stopped_;                        // drains_stopped_mu_
  std::map<std::string, int> move_cancels_;             // owner -> its cell, store_mu_
  // Where each draining cell's walk through its devices is (the last id
  // looked at): every device is asked in turn, however many before it have
  // not moved yet. store_mu_.
  std::map<int, std::string> drain_cursor_;
  // Cells whose stopped drain had moves this process may not know it asked
  // (Cell::drain_inherited): every device still in them is told again to
  // stay on its cell's broker, a chunk per tick; cell -> the last id
  // queued. store_mu_.
  std::map<int, std::string> withdraw_sweeps_;
  // Marks a cell draining and, when this hub keeps its own drains, records
  // it in the store first so a restart keeps it. store_mu_ held.
  Status start_drain(Cell& c, bool inherited);
  // At start, the drains this hub kept in its store (shares_drains() false).
  void resume_drains();
  // The draining set lives in the coordinator (hub processes sharing cells),
  // not in this hub's store.
  bool shares_drains() const { return cfg_.share_cells && cfg_.coordinator != nullptr; }
  // Whether a device recorded in `cell` may arrive elsewhere: the cell
  // drains, or stopped draining less than kUndrainGraceMs ago.
  bool lets_devices_leave(int cell) const;
  std::atomic<uint64_t> other_cell_dropped_{0};
  void drain_cell(Cell& c);
  v1::EnrollResponse enroll_response(const DeviceRecord& d) const;
  // A device certificate for a request, with the store row it needs.
  Result<std::pair<v1::EnrollResponse, DeviceCertRecord>> certificate_for(const std::string& csr,
                                                                         const std::string& device_key,
                                                                         const std::string& device_id);
  bool is_decommissioned(const std::string& id) const;
  void worker(Cell& c);
  struct ParsedMessage;
  // A device's campaign rows touched by one batch, read once and written once.
  struct CachedCampaignRow {
    std::optional<CampaignDeviceRecord> row;
    bool dirty = false;
  };
  using CampaignRows = std::map<std::string, CachedCampaignRow>;  // by campaign id
  // A batch's messages parsed and grouped by device, each device's in
  // order; a presence "offline" (which can change other devices' rows)
  // closes a group, so applying the groups in order keeps every device's
  // order and the barriers. Pure: runs without store_mu_.
  using DeviceGroups = std::vector<std::pair<std::string, std::vector<ParsedMessage>>>;
  DeviceGroups parse_batch(const std::vector<transport::Message>& batch);
  // What a batch applied: added to reports_processed_/presence_processed_
  // once it is committed, so a count read there is already readable.
  struct Applied {
    uint64_t reports = 0, presences = 0;
  };
  // With file_alone (the cell's file held alone: StoreMutex::FileLock)
  // only a device whose rows are in this cell's file and stay there is
  // applied; anything that needs hub.db (a device arriving from another
  // cell, an unknown one, an outcome recovered from an idle report) returns
  // false having written nothing, for the caller to apply under the whole lock.
  bool apply_device_messages(const std::string& device_id, const std::vector<ParsedMessage>& msgs, int cell,
                             bool file_alone, Applied& applied);
  // Applies groups[from..] to cell c's store in one transaction and returns
  // where it stopped: at the end, or (file_alone) at the first group that
  // needs the whole lock.
  size_t apply_groups(Cell& c, const DeviceGroups& groups, size_t from, bool file_alone);
  // Set (on this thread) by what found it needs hub.db while the thread
  // holds one cell's file alone; apply_device_messages then stops.
  static bool& needs_whole_lock();
  void apply_report(DeviceRecord& dev, const v1::Report& r);
  // One desired-state message, decided inside a store transaction and
  // published after it commits. What every device of a campaign shares (the
  // signed bundle, the trust chain, the artifact base URL) is serialized once
  // and shared; per device only a small head (id, generation, campaign).
  // The shared tail, and what each device's signed header binds it by.
  struct SharedDesired {
    std::string bytes;              // DesiredState{bundle, trust, artifact_base_url}, encoded once
    std::string manifest_sha256;    // raw 32 bytes, of the bundle's manifest
    std::string artifact_base_url;
  };
  using SharedDesiredPtr = std::shared_ptr<const SharedDesired>;
  struct PendingDesired {
    std::string device_id, gateway, campaign_id;
    uint64_t generation = 0;
    bool rollback = false;
    SharedDesiredPtr shared;
    // The device's labels as the store has them now: signed into the header
    // so a relabelled device selects its overlays without enrolling again.
    std::map<std::string, std::string> labels;
    // The campaign's Strategy::k3s_action is rotate_certificates (never on a
    // rollback: that only returns the device to its previous bundle).
    bool rotate_certificates = false;
    int cell = 0;  // whose broker carries it
    // Set: the device is told to move to this broker (a drain), signed in
    // its header. With generation 0 the message is a move alone.
    std::string move_to;
  };
  // The device's current desired state again on its cell's broker, with a
  // move to `move_to` or (empty) without one.
  std::optional<PendingDesired> desired_again(const DeviceRecord& d, const std::string& move_to,
                                              std::map<std::string, SharedDesiredPtr>& cache);
  using Publishes = std::vector<PendingDesired>;
  // The shared part for a bundle; call with store_mu_ held. `cache` keeps
  // one per bundle for the caller's loop.
  Result<SharedDesiredPtr> desired_shared(const std::string& bundle_id, std::map<std::string, SharedDesiredPtr>& cache);
  Status publish_desired(const PendingDesired& p);
  void publish_all(const Publishes& publishes, const char* what);
  // The pending desired states of a cell's devices (-1: every cell's).
  void republish_pending(int cell = -1, const std::string& only_device = "");
  void engine_loop();
  // What this hub released to a device (its desired generation, bundle and
  // campaign): written in the store but never in the control log, even when
  // called inside a control write (ControlLog::LocalWrites).
  Status set_released_desired(int cell, const std::string& device_id, uint64_t generation, const std::string& bundle_id,
                              const std::string& campaign_id);
  // Waiting rows the tick may release now: its wave reached, the device in
  // its maintenance window, at most n, in wave and rank order.
  Result<std::vector<CampaignDeviceRecord>> releasable_now(const CampaignRecord& c, const Strategy& s, bool online,
                                                           int64_t n, int64_t now_ms);
  // The devices one tick releases: online ones within online_budget, then
  // offline ones up to total_cap (outside maintenance windows).
  Result<std::vector<CampaignDeviceRecord>> pick_releasable(const CampaignRecord& c, const Strategy& s,
                                                            int64_t online_budget, int64_t total_cap, int64_t now_ms);
  // Live membership, control data first and the rows after (ADR 18).
  // Inside the control write that enrolls or relabels devices: the time
  // zones of those that now match a live campaign with a maintenance window,
  // added to the campaign's record. store_mu_ held.
  void note_member_zones(const std::vector<DeviceRecord>& devices);
  // A live campaign as its membership is followed (parsed once per
  // following of the outbox).
  struct LiveCampaign {
    CampaignRecord c;
    Strategy strategy;
    Selector selector;
    bool rows_here = false;            // this store holds rows of it
    std::map<int, bool> cell_has_rows;  // share_cells: asked once per cell
  };
  std::vector<LiveCampaign> live_campaigns();
  // After the write, from the directory's outbox (an enrollment or a label
  // change, made here or on another hub): the device joins the live
  // campaigns whose selector it now matches, rejoins one it had left, or
  // leaves one it no longer matches before its release; in its cell's store,
  // on the hub that keeps the cell's rows. Idempotent. A hub not sharing
  // cells makes rows only of campaigns it holds rows of, or for its own
  // writes (change.local). store_mu_ held.
  void follow_membership(const DirectoryChange& change, std::vector<LiveCampaign>& live);
  // An automatic action of the engine, in the audit log with what triggered it.
  void audit_engine_action(const CampaignRecord& c, const std::string& action, const nlohmann::json& detail);
  void on_campaign_report(const DeviceRecord& dev, const v1::Report& r, CampaignRows& rows);
  bool finished_without_outcome(CampaignDeviceRecord& row, const v1::Report& r);
  // The decision (inside a control write); the cells send their devices
  // back in carry_out once it committed.
  void start_rollback(CampaignRecord& c, const std::string& reason);
  Result<BundleRecord> bundle_with_envelope(const std::string& id);

  // A cell filter: nullopt = every cell (this hub owns them all: no filter
  // at all, as one hub was).
  using CellFilter = std::optional<std::vector<int>>;
  // A tick in two steps (ADR 18): decisions in the control write, then
  // what they imply in the stores of this hub's cells.
  struct CellWork {
    CampaignRecord campaign;    // as decided (committed)
    bool release = false;       // its cells release devices now
    int64_t online_budget = 0;  // online devices they may release (in flight, rate)
    int64_t total_cap = 0;      // devices they may release in all
    bool rate_spent_applied = false;  // the decision spent rate_spent_'s count
    bool followed = false;      // carry_out did an abort's or rollback's part
  };
  // The owned cells by the store that holds them: one transaction per
  // store. filter: what the store's queries take (nullopt: every cell, when
  // one store holds them all).
  struct CellGroup {
    DeviceStore* store = nullptr;
    std::vector<int> cells;
    CellFilter filter;
    bool holds(int cell) const { return std::find(cells.begin(), cells.end(), cell) != cells.end(); }
  };
  struct ReleaseScratch;
  CellWork decide_campaign(CampaignRecord& c);
  // Writes a decision's campaign record (updated_ms = now); an error is logged.
  void save_decision(CampaignRecord& c, int64_t now);
  void judge_waves(CampaignRecord& c, const Strategy& strategy, const std::vector<CampaignCountRow>& counts,
                   const CampaignCounts& all, int64_t now);
  std::vector<CellGroup> store_groups(const CellFilter& cells);
  int64_t carry_out(CellWork& w, Publishes& publishes);
  int64_t release_rows(const CampaignRecord& c, const Strategy& strategy, const CellGroup& g,
                       std::vector<CampaignDeviceRecord>& ready, ReleaseScratch& scratch, Publishes& publishes,
                       int64_t now);
  // Waiting rows of the group's cells become skipped (an abort).
  void skip_waiting(const CampaignRecord& c, const CellGroup& g, int64_t now);
  // Sends the group's devices of the campaign back (waiting ones skipped);
  // rows found with no way back are marked once and left alone. Returns
  // how many were sent.
  int64_t roll_back_cells(const CampaignRecord& c, const CellGroup& g, Publishes& publishes);

  // Campaigns across cells (campaign_cells.cpp).
  static bool in_cells(const CellFilter& cells, int cell);
  CellFilter cell_filter() const;
  // Claims the cells (taking back its own after a restart), renews the
  // leases, campaigns for leadership.
  void coordinate();
  // share_cells: announces this hub under its lease, gives up a cell while
  // it holds more than its share, claims free cells up to it. coord_mu_ held.
  void balance_cells(const std::function<void(const std::string&, const Error&)>& warn);
  // share_cells: the campaign's membership rows of each owned cell, made
  // from the replicated directory by the deterministic rank when this
  // store has none (a campaign created on another hub, or a cell taken
  // over), in one transaction of the cell's store, before the tick's
  // decisions and outside their control write. store_mu_ held.
  void ensure_cell_membership(const CampaignRecord& c);
  // The cells whose devices the engine may release now: the owned ones,
  // less (share_cells) those still waiting for their roll call's answers.
  CellFilter release_filter() const;
  // share_cells: a device of a cell this hub took over reports a generation
  // this hub never sent (the cell's previous owner released it): its row
  // and desired generation follow the device. store_mu_ held.
  void adopt_reported_generation(DeviceRecord& dev, const v1::Report& r, CampaignRows& rows);
  // The matching devices of a campaign with their waves; only those of
  // `cell` when given (the waves are computed over every device either way,
  // so a count-based canary cuts the same). store_mu_ held.
  Result<std::vector<CampaignMember>> campaign_members(const CampaignRecord& c, const Selector& sel,
                                                              const Strategy& strategy, std::optional<int> cell);
  // The rank at or below which a device is in the count-based canary of c
  // (1.0 when fewer devices match than the canary's count); kept per
  // campaign in canary_cutoffs_. store_mu_ held.
  Result<double> canary_cutoff(const CampaignRecord& c, const Selector& sel, const Strategy& strategy);
  std::map<std::string, double> canary_cutoffs_;  // store_mu_
  // Every cell's counts of a campaign: this hub's own cells counted now,
  // the others as last published, own cells read from `from` (store_ under
  // store_mu_, or a reader).
  Result<std::vector<CellCampaignCounts>> cell_counts(Store& from, const std::string& campaign_id);
  // The totals over every cell the decisions are made on. unheard (when
  // given): the cells with members of the campaign that this hub does not
  // own and no hub has published counts for yet; the leader decides
  // nothing while there is one (their devices would look absent, and a
  // campaign complete; only the engine asks, with from = store_ under
  // store_mu_). from: as for cell_counts.
  Result<std::vector<CampaignCountRow>> campaign_totals(Store& from, const std::string& campaign_id,
                                                        std::vector<int>* unheard = nullptr);
  Result<std::optional<CampaignView>> campaign_view_on(Store& from, const std::string& id, bool with_devices);
  // The cells a campaign has members in: from this store's rows, or (hubs
  // sharing cells, whose stores hold their own cells' rows) from the
  // replicated device rows, once per campaign. store_mu_ held.
  Result<std::vector<int>> campaign_member_cells(const std::string& campaign_id);
  // Publishes each own cell's counts of the campaign if they changed. store_mu_ held.
  void publish_cell_counts(const std::string& campaign_id);
  mutable std::mutex coord_mu_;
  std::unique_ptr<coord::CellOwnership> ownership_;  // coord_mu_
  std::unique_ptr<CampaignBoard> board_;              // coord_mu_
  std::unique_ptr<Leadership> leadership_;            // coord_mu_
  CellFilter owned_;                                  // coord_mu_
  coord::LeaseId announced_lease_ = 0;                // coord_mu_ (share_cells)
  std::atomic<uint64_t> served_mask_{0};              // the owned cells, a bit each (share_cells)
  // (campaign, cell) pairs whose membership rows exist here (share_cells).
  std::set<std::pair<std::string, int>> members_built_;  // store_mu_
  std::map<std::string, std::vector<int>> member_cells_;  // store_mu_ (share_cells)
  std::atomic<bool> leader_{true};
  bool director_configured_ = false;
  std::mutex identity_mu_;
  bool identity_checked_ = false;         // identity_mu_
  std::optional<Error> identity_error_;   // identity_mu_

  // Runs f (returning Status or Result<T>) as one control write: in the
  // control log when there is one (f may then run again after another hub
  // wrote first), else simply f. f takes store_mu_ itself.
  // guard: what the write also depends on (the campaign leader's key for
  // the engine's decisions); refused, nothing written, once it fails.
  template <class F>
  auto control_write(F&& f, const std::vector<coord::Compare>& guard = {}) -> decltype(f()) {
    using R = decltype(f());
    if (!control_log_) {
      if (!control_log_status_) return control_log_status_.error();
      return f();
    }
    std::optional<R> out;
    Status s = run_control_write(
        [&]() -> Status {
          out.emplace(f());
          if (!*out) return out->error();
          return {};
        },
        guard);
    if (!s) return s.error();
    return std::move(*out);
  }
  Status run_control_write(const std::function<Status()>& fn, const std::vector<coord::Compare>& guard);
  // Hubs sharing one control log must sign desired states with one director
  // key and issue device certificates from one device CA, or devices
  // enrolled through one hub refuse what another sends them. The first hub
  // records both fingerprints at /flotilla/identity; every other compares
  // (at start, or at its first control write once the coordinator answers).
  // A mismatch is an error naming both, and every control write is refused.
  // Only what was configured is checked (not an ephemeral test key).
  Status ensure_shared_identity();
  // Caches derived from control data, refreshed after another hub's entries
  // changed these tables.
  void on_control_applied(const std::set<std::string>& tables);

  // A device's whole record: its directory entry in `from` (store_ under
  // store_mu_, or a read connection of it) says which cell's store holds
  // the rest (ADR 18: stores_for(from)), and whether it was decommissioned
  // (the directory's word, not the reported state's), into *decommissioned.
  Result<std::optional<DeviceRecord>> device_record(Store& from, const std::string& id,
                                                    bool* decommissioned = nullptr);
  // The store of one cell's devices (ADR 18): what code that knows a
  // device's cell reads and writes it through: store_ (hub.db), or the
  // cell's own file (ServiceConfig::cell_files); store_mu_ either way.
  DeviceStore& device_store(int cell) {
    if (cfg_.cell_files.empty()) return store_;
    return *cfg_.cell_files[static_cast<size_t>(cell)];
  }
  bool cell_files() const { return !cfg_.cell_files.empty(); }
  // The device stores a read of `from` covers: each cell's file when `from`
  // is the writer's store and cells have files of their own; else `from`.
  std::vector<DeviceStore*> stores_for(Store& from);
  // The cells whose devices have rows of the campaign in those stores.
  Result<std::vector<int>> cells_with_rows(Store& from, const std::string& campaign_id);
  // Whether any of this hub's device stores holds rows of the campaign.
  Result<bool> holds_rows(const std::string& campaign_id);
  // With cell files, at start: what the directory says each file holds
  // (reconcile_cell_file), after the outbox was followed.
  void reconcile_cell_files();
  // The device rows follow the directory's changes (moves, decommissions,
  // enrollments and label changes) that committed: after a write that may
  // make them (a report batch that moved a device, arrivals, a
  // decommission, an enrollment or relabelling, entries from the control
  // log) and at start, for what a crash left. store_mu_ held.
  void follow_directory();
  // The same right after this process's control write that changed
  // `devices` committed (its entries are marked local_directory_write).
  // Takes store_mu_.
  void follow_own_write();

  Store& store_;
  const Clock& clock_;
  ServiceConfig cfg_;
  ArtifactStore* artifacts_ = nullptr;
  // The cells, made at construction and never resized.
  std::vector<std::unique_ptr<Cell>> cells_;
  // Devices per cell, decommissioned ones left out (store_mu_): where the
  // next new device goes.
  std::vector<int64_t> cell_devices_;
  LogLimiter log_limit_{clock_};
  std::atomic<uint64_t> dropped_too_large_{0};
  AggregateStore* aggregates_ = nullptr;
  std::once_flag own_reads_once_;
  std::unique_ptr<AggregateStore> own_reads_;

  // Recursive: a declarative apply holds it across one transaction while it
  // calls the same operations (create_campaign, campaign_action,
  // upload_bundle, create_token) the REST routes call on their own.
  StoreMutex store_mu_;
  // Enrollments share commits (one fsync for all that queued meanwhile).
  GroupCommit enroll_commits_{store_mu_, store_.db()};
  std::mutex cred_sync_mu_;                 // one password-file rewrite at a time
  std::mutex crl_sync_mu_;                  // one revocation-list reload at a time
  std::atomic<uint64_t> crl_changes_{0};
  uint64_t crl_synced_ = 0;                 // (crl_sync_mu_)
  mutable std::mutex crl_mu_;
  std::string crl_pem_;                     // what the broker loaded last (crl_mu_)
  int64_t crl_next_update_ = 0;             // unix seconds (crl_mu_)
  // Devices decommissioned: whatever still arrives from them is dropped
  // before it is queued (their certificate is revoked, their session taken
  // over; this covers what was already on its way).
  mutable std::mutex decommissioned_mu_;
  std::set<std::string> decommissioned_;
  std::atomic<bool> any_decommissioned_{false};
  std::atomic<uint64_t> dropped_decommissioned_{0}, certificates_issued_{0}, renewals_{0};
  std::atomic<uint64_t> cred_changes_{0};   // credential changes asked to be synced
  uint64_t cred_synced_ = 0;                // changes covered by the last rewrite (cred_sync_mu_)
  std::atomic<bool> stopping_{false};
  std::thread engine_;
  std::condition_variable engine_cv_;
  std::mutex engine_mu_;
  // Keeps the cell and leader leases alive on a thread of its own: the
  // engine's tick can wait on the store for longer than a lease lives (a
  // 250,000-device campaign being created), and a lease lost that way
  // costs the hub its cells and its leadership mid-campaign.
  std::thread keeper_;
  std::condition_variable keeper_cv_;
  std::mutex keeper_mu_;
  // Rows one tick releases at most; a tick that hit it asks for the next at once.
  static constexpr int64_t kReleaseChunk = 5000;
  std::atomic<bool> retick_{false};
  // Devices released per campaign since its last decision: the next one
  // spends them from its rate's tokens (store_mu_). A crash loses at most
  // one tick's count, so a rate may let that many more go once.
  std::map<std::string, int64_t> rate_spent_;
  // (campaign, cell) whose abort or rollback this process carried out in
  // that cell; not repeated every tick (store_mu_).
  std::set<std::pair<std::string, int>> followed_;
  std::map<std::string, BundleRecord> bundle_cache_;  // envelopes for publishing, by id (store_mu_)
  std::unique_ptr<ControlLog> control_log_;  // null with one hub
  Status control_log_status_;
  Status enable_control_log(coord::Coordinator& c, const ControlLogOptions& opts);
  std::function<void(const std::string&)> git_sync_trigger_;
  std::atomic<uint64_t> reports_processed_{0};
  std::atomic<uint64_t> reports_received_{0}, presence_received_{0}, other_received_{0};
  std::atomic<uint64_t> gateway_batches_received_{0};
  std::atomic<uint64_t> presence_processed_{0};
  // Presence after a broker restart or a lost session (docs/architecture.md,
  // "Presence after a broker restart").
  std::atomic<uint64_t> presence_resets_{0}, rollcalls_{0}, stale_presence_ignored_{0};
  // Until then the campaign engine does not judge a wave done: devices that
  // are online but have not answered the roll call yet look offline.
  std::atomic<int64_t> presence_settle_until_ms_{0};
  std::atomic<int64_t> presence_reset_count_{0}, reannounced_{0};
  // Marks the cell's devices offline; session_began: a new session, whose
  // roll call waits for them (and for those marked when the last one was lost).
  void reset_presence(Cell& c, bool session_began);
  std::atomic<uint32_t> rollcall_spread_ms_{0};
  std::atomic<uint64_t> desired_published_{0}, desired_publish_failures_{0};
  // Report batches are committed in one transaction; its latency is the
  // store's health as devices see it.
  Histogram report_commit_seconds_{{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}};
};

// "AGENT_STATE_APPLIED" -> "applied"; "REASON_BAD_SIGNATURE" -> "bad_signature".
std::string state_name(v1::AgentState s);
std::string reason_name(v1::Reason r);
// True for a campaign row status that is an outcome (applied, failed, superseded, skipped, rolled_back,
// rollback_failed).
bool campaign_status_is_final(const std::string& status);

}  // namespace flotilla::hub
