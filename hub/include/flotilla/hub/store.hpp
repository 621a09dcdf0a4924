#pragma once
// The hub's records and their SQLite store. Device rows are a cache of
// device reports plus campaign bookkeeping (DESIGN.md, data ownership).
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "flotilla/common/result.hpp"
#include "flotilla/common/sqlite.hpp"
#include "flotilla/bundles/selector.hpp"
#include "flotilla/hub/campaign.hpp"

namespace flotilla::hub {

using bundles::Labels;
using bundles::Selector;
using bundles::valid_label_key;
using bundles::valid_label_value;

// What a device's reports say about its machine (issue 15): kept in one
// place, the device_inventory table, written only when a report carries an
// inventory (at connect and when it changes), not at every report. Device
// reads join it, so DeviceRecord::inventory is always that row (zeros and ""
// when the device never sent one).
struct DeviceInventory {
  std::string k3s_role;          // "server" or "agent"; "" = not reported
  std::string cluster_id;
  int64_t cert_expiry_unix = 0;  // k3s serving certificate; 0 = not reported
  std::string os;
  uint64_t disk_free_bytes = 0;  // of the filesystem holding k3s's data dir
  uint64_t disk_total_bytes = 0;
  uint64_t mem_free_bytes = 0;
  uint64_t mem_total_bytes = 0;
  bool clock_suspect = false;
  int64_t updated_ms = 0;        // 0 = no inventory row
};

struct DeviceRecord {
  std::string id;
  std::string project = "default";
  Labels labels;
  std::string public_key_hex;
  std::string hostname;
  std::string arch;
  std::string agent_version;
  int64_t enrolled_ms = 0;
  int64_t last_seen_ms = 0;
  bool online = false;
  std::string state = "enrolled";   // last reported agent state
  std::string applied_bundle;       // name of the bundle it runs
  uint64_t applied_version = 0;
  std::string k3s_version;
  bool node_ready = false;
  std::string last_reason;          // reason code name of the last failure
  std::string last_message;
  uint64_t last_seq = 0;
  uint64_t generation = 0;          // of the desired state last published
  std::string desired_bundle_id;
  std::string campaign_id;
  // The gateway this device talks through (empty: its own MQTT session).
  // Set at enrollment only; it decides the device's topics.
  std::string gateway;
  // issued_unix_ms of the enrollment request last taken (0: an older proof
  // without it). A later enrollment must be newer: a replay changes nothing.
  uint64_t enroll_issued_ms = 0;
  // The cell (broker and shard, docs/architecture.md "Cells") the device
  // talks through: chosen at enrollment, kept by a re-enrollment or
  // renewal, changed only when a drain moves the device. A device behind a
  // gateway is in its gateway's cell.
  int cell = 0;
  // The device_inventory row (read-only here: save_device_state does not
  // write it, save_device_inventory does).
  DeviceInventory inventory;
};

// What the hub's device directory holds of a device (ADR 18): identity,
// ownership and routing, written by enrollment, labels, decommission and
// drains; nothing a report changes. Enrollment, renewal, gateways and
// targeting read only this, so they need not know the device's cell.
struct DeviceDirectoryEntry {
  std::string id;
  std::string project = "default";
  Labels labels;
  std::string public_key_hex;
  std::string hostname;
  int64_t enrolled_ms = 0;
  uint64_t enroll_issued_ms = 0;  // DeviceRecord::enroll_issued_ms
  std::string gateway;
  int cell = 0;
  bool decommissioned = false;
  // As enrolled: what a cell's copy starts with until the device's first
  // report (which sets both in the cell's copy).
  std::string arch, agent_version;
};

// A change of the directory that a device's rows in its cell's store must
// follow (ADR 18, slice 5): kept in hub.db's directory_outbox by triggers
// on the directory's columns, so changes applied from the control log and
// snapshots are followed too, and applied after the write that made them
// commits (HubService::follow_directory). Applying one twice is harmless.
// A `labelled` change (an enrollment, or labels changed) is the hub's to
// follow: live campaigns' membership (HubService::follow_membership).
struct DirectoryChange {
  enum class Kind { moved, decommissioned, labelled };
  int64_t seq = 0;
  std::string device_id;
  Kind kind = Kind::moved;
  int cell = 0;       // the device's cell after the change
  int from_cell = 0;  // before it (a move's rows are in that cell's store)
  // Written by this hub (local_directory_write, in the write's own
  // transaction), not applied from the control log or a snapshot. Kept with
  // the entry, so it holds whichever follow takes the entry, and after a
  // crash.
  bool local = false;
};

struct BundleRecord {
  // Unique in the hub. In project "default", the first 16 hex digits of the
  // manifest's SHA-256 (what `flotilla bundle inspect` shows); in any other
  // project those of SHA-256(project ":" digest), so the same manifest
  // uploaded by two projects is two bundles (bundle_id()).
  std::string id;
  std::string project = "default";
  std::string digest;    // full hex SHA-256 of the manifest
  std::string name;
  std::string channel;
  uint64_t version = 0;
  int64_t expires_unix = 0;
  int signatures = 0;
  int64_t uploaded_ms = 0;
  std::string envelope;  // the signed bundle (manifest bytes exactly as signed; signatures merged)
};

struct CampaignRecord {
  std::string id;
  std::string name;
  std::string bundle_id;
  std::string selector;
  CampaignState state = CampaignState::running;  // its name in the store's column
  int64_t created_ms = 0;
  int64_t updated_ms = 0;
  std::string project = "default";
  std::string strategy;      // JSON (hub::Strategy)
  int current_wave = 0;
  int64_t wave_done_ms = 0;  // when the current wave finished (soak start); 0 = not yet
  std::string state_reason;  // why it paused, aborted or rolled back
  // Outcomes already counted when an operator resumed past the threshold: the
  // threshold then judges only what happens after.
  int64_t baseline_failed = 0;
  int64_t baseline_finals = 0;
  int approved_wave = 0;      // the highest wave an operator approved (approval gates)
  // The rate limit's token bucket: releases it may still make, as of rate_ms.
  double rate_tokens = 0;
  int64_t rate_ms = 0;
  // Distinct time zones of its devices, comma-separated (maintenance windows).
  std::string zones;
};

// One device in one campaign. Statuses: waiting (its wave has not started),
// pending (desired state published), in_progress, and the final ones:
// applied, failed, superseded, skipped (never released), rolled_back,
// rollback_failed; rolling_back in between.
struct CampaignDeviceRecord {
  std::string campaign_id;
  std::string device_id;
  std::string status;
  uint64_t generation = 0;
  int64_t updated_ms = 0;
  std::string reason;
  std::string message;
  int wave = 0;
  double rank = 0;
  int64_t released_ms = 0;
  // The deadline counts only time the device is online after its release
  // (the store's triggers pause it while the device is away): deadline_ms is
  // when it runs out, 0 while paused; deadline_left_ms is what is left.
  int64_t deadline_ms = 0;
  int64_t deadline_left_ms = 0;
  std::string prev_bundle_id;      // what the device ran before, for rollback
  uint64_t rollback_generation = 0;
  std::string zone;                // its time zone, for a campaign with a maintenance window
  int cell = 0;                    // its device's cell (a drain moves it along)
};

// Everything a cell's store holds of one device but its directory columns:
// what a move between cells' files carries (DeviceStore::export_device).
struct DeviceRows {
  DeviceRecord device;  // report and presence columns, and its inventory (updated_ms 0: none)
  std::vector<CampaignDeviceRecord> campaigns;
};

// Counts of a campaign's devices by wave, status and presence.
struct CampaignCountRow {
  int wave = 0;
  std::string status;
  bool online = false;
  int64_t count = 0;
  bool operator==(const CampaignCountRow&) const = default;
};

struct TokenRecord {
  std::string id;
  std::string name;
  std::string role;      // admin, operator, viewer (API tokens); enroll (enrollment tokens)
  std::string project = "default";
  Labels labels;         // enrollment tokens: labels given to devices
  // Enrollment tokens: label keys a device may set itself (any value); every
  // other label a device asks for is refused. Empty: labels come only from the token.
  std::vector<std::string> device_label_keys;
  int64_t expires_unix = 0;  // 0 = never
  int64_t max_uses = 0;      // 0 = unlimited
  int64_t uses = 0;
  int64_t created_ms = 0;
  bool revoked = false;
};

// The id a bundle with this manifest digest gets in project (BundleRecord::id).
std::string bundle_id(const std::string& project, const std::string& digest);

// One mutating API call (or enrollment), as the append-only audit log keeps it.
// Never a secret or a body: who, what, when, outcome.
struct AuditRecord {
  int64_t id = 0;
  int64_t time_ms = 0;
  std::string actor = "anonymous";  // API token id, "enrollment-token:<id>" or "anonymous"
  std::string actor_name;
  std::string role;
  std::string project;
  std::string method;
  std::string path;
  std::string detail;
  int status = 0;
  std::string peer;
  // Already written, inside the transaction of the change it records (an
  // enrollment): one commit, so one fsync, for both.
  bool stored = false;
};

// An object applied from a declarative file (store/declarative_store.cpp):
// what was declared, which apply set owns it, and what it made.
struct AppliedObject {
  std::string kind;       // Campaign, EnrollmentToken, ApiToken, BundlePublication, GitRepo
  std::string project;
  std::string name;
  std::string apply_set;  // "" = applied without --applyset
  std::string desired;    // JSON {labels, spec[, bundle]} as last applied
  int64_t generation = 0;           // +1 on every change of what is declared
  int64_t observed_generation = 0;  // the generation the hub has acted on
  std::string target;     // campaign id, token id, bundle id, GitRepo name
  std::string source;     // "campaigns.yaml doc 2" or "gitrepo fleet@<commit>: ..."
  int64_t created_ms = 0;
  int64_t updated_ms = 0;
  int runs = 1;           // campaigns: how many runs the name has had
};

// A Git repository the hub follows, and where its sync stands.
struct GitRepoRecord {
  std::string name;
  std::string project = "default";
  std::string url;
  std::string branch = "main";
  std::string path;
  int64_t interval_ms = 60000;
  int64_t created_ms = 0;
  int64_t updated_ms = 0;
  std::string commit;          // last commit applied
  std::string attempt_commit;  // commit of the last attempt
  int64_t last_attempt_ms = 0;
  int64_t last_success_ms = 0;
  std::string error;           // of the last attempt; "" = it went through
  std::string applied;         // JSON list of "Kind/project/name" the last commit applied
};


// One row of the trigger-kept counts: how many devices of a project have
// `value` in dimension `dim` (fleet_counts: state, online, version, k3s,
// agent, cert_day; directory_counts: region, cell, broker_cert_day). See
// store/aggregate_store.cpp.
struct FleetCount {
  std::string project;
  std::string dim;
  std::string value;
  int64_t n = 0;
  bool operator==(const FleetCount&) const = default;
  bool operator<(const FleetCount& o) const {
    return std::tie(project, dim, value, n) < std::tie(o.project, o.dim, o.value, o.n);
  }
};

// A broker client certificate the device CA issued (store/cert_store.cpp).
// Kept so a decommission can revoke every certificate of the device that
// has not expired yet; the certificate itself stays with the device.
struct DeviceCertRecord {
  std::string serial;     // hex, lower case
  std::string device_id;
  int64_t not_before = 0; // unix seconds
  int64_t not_after = 0;
  int64_t issued_ms = 0;
  int64_t revoked_ms = 0; // 0 = not revoked
};

// How much memory SQLite may use for the store's pages.
struct StoreTuning {
  // SQLite's own page cache. Its default is 2 MiB: at 100k devices every
  // report then re-read its rows' pages from the kernel (a third of the
  // hub's CPU in perf). A fixed cost, not a per-device one.
  int64_t cache_mib = 64;
  // Maps up to this much of the database file: reads then come straight
  // from the kernel's page cache without a copy or a system call (a 1M-device
  // store is larger than the page cache). Mapped pages show in the hub's RSS
  // but are the kernel's to drop. 0 = off.
  int64_t mmap_mib = 0;
};

// One device of a new campaign: everything else of its row is the default
// (status waiting).
struct CampaignMember {
  std::string device_id;
  double rank = 0;
  int wave = 0;
  std::string zone;
  // Its device's cell: whose store the row goes to (the row's own cell
  // column is taken from the device row).
  int cell = 0;
};

// Devices of one cell: `total` from the directory, `online` from the
// cell's reports.
struct CellDeviceCount {
  int cell = 0;
  int64_t total = 0, online = 0;
  bool operator==(const CellDeviceCount&) const = default;
};

// What one cell's shard controller reads and writes of its own devices
// (ADR 18): report and presence columns, inventory, and the campaign rows
// and counts of the cell's devices. A hub reaches it through
// HubService::device_store(cell). Today every cell's DeviceStore is the one
// Store below (hub.db); ADR 18's per-cell files implement it per cell, so
// code that knows a device's cell calls this, not Store.
class DeviceStore {
 public:
  virtual ~DeviceStore() = default;

  virtual Result<std::optional<DeviceRecord>> get_device(const std::string& id) = 0;
  // Report and presence fields of one device (never its directory columns:
  // labels, project, key, gateway, cell).
  virtual Status save_device_state(const DeviceRecord& d) = 0;
  // Stores a report's inventory; nothing for a decommissioned device.
  virtual Status save_device_inventory(const std::string& device_id, const DeviceInventory& inv) = 0;
  // A gateway's session ended (its will fired): every device behind it is offline.
  virtual Status set_gateway_devices_offline(const std::string& gateway, int64_t now_ms) = 0;
  // Every device the hub had as online is marked offline (presence unknown
  // after a broker restart or a lost session of the hub's); returns how many.
  virtual Result<int64_t> set_all_devices_offline() = 0;
  // The same for the devices of one cell (a cell's broker session began again).
  virtual Result<int64_t> set_cell_devices_offline(int cell) = 0;
  // Devices reported online (decommissioned ones left out), by cell in
  // cell order; `total` is left 0 (the directory's: cell_device_totals).
  virtual Result<std::vector<CellDeviceCount>> online_by_cell(const std::string& project = "*") = 0;
  // The devices with their own session in a cell (gateways included, the
  // devices behind them not: they move with their gateway), in id order
  // after `after` (a cursor: the last id of the page before), up to limit.
  virtual Result<std::vector<std::string>> cell_session_devices(int cell, int64_t limit,
                                                                const std::string& after = "") = 0;

  // A member's row (status waiting) in the cell the member names (the
  // directory's answer: no device row is read); nothing if it has one. A
  // new campaign's members, a device that came to match a running one.
  virtual Status add_campaign_member(const std::string& campaign_id, const CampaignMember& m, int64_t now_ms) = 0;
  virtual Result<std::vector<CampaignDeviceRecord>> campaign_devices(const std::string& campaign_id) = 0;
  virtual Result<std::vector<CampaignDeviceRecord>> campaign_devices_with_status(
      const std::string& campaign_id, const std::vector<std::string>& statuses) = 0;
  virtual Result<std::optional<CampaignDeviceRecord>> campaign_device(const std::string& campaign_id,
                                                                      const std::string& device_id) = 0;
  // Writes everything but the deadline, which start_deadline sets at release
  // and the presence triggers pause and resume.
  virtual Status save_campaign_device(const CampaignDeviceRecord& cd) = 0;
  virtual Status start_deadline(const std::string& campaign_id, const std::string& device_id, int64_t budget_ms,
                                int64_t now_ms) = 0;
  // From the trigger-kept campaign_counts table: the counts of the
  // campaign's devices in one cell.
  virtual Result<std::vector<CampaignCountRow>> campaign_counts(const std::string& campaign_id, int cell) = 0;
  // The same over every cell this store holds rows of.
  virtual Result<std::vector<CampaignCountRow>> campaign_counts(const std::string& campaign_id) = 0;
  // The cells whose devices have rows of the campaign here, ascending.
  virtual Result<std::vector<int>> campaign_cells(const std::string& campaign_id) = 0;
  // Failed and rollback_failed rows by reason ("unknown" when empty).
  virtual Result<std::map<std::string, int64_t>> failure_reasons(const std::string& campaign_id) = 0;
  // Unfinished rows of offline devices, the first `limit` by device id.
  virtual Result<std::vector<std::string>> away_devices(const std::string& campaign_id, int64_t limit) = 0;
  // The failed rows of a campaign, the first `limit` by (time, device id).
  virtual Result<std::vector<CampaignDeviceRecord>> campaign_failures(const std::string& campaign_id,
                                                                      int64_t limit) = 0;
  // The same figures grouped from the cell's device rows (what the triggers
  // must agree with).
  virtual Result<std::vector<CampaignCountRow>> recount_campaign(const std::string& campaign_id, int cell) = 0;
  // Waiting rows of waves up to max_wave whose device is online (or
  // offline), by wave and rank; at most `limit` of them; only those of one
  // time zone when `zone` is given.
  // `cells`: only devices in those cells (nullopt: every cell).
  virtual Result<std::vector<CampaignDeviceRecord>> releasable(
      const std::string& campaign_id, int max_wave, bool online, int64_t limit, const std::string& zone = "",
      const std::optional<std::vector<int>>& cells = std::nullopt) = 0;
  // Pending/in-progress rows of online devices whose deadline passed become
  // failed (only in `cells`; nullopt: every cell).
  virtual Result<int64_t> expire_deadlines(const std::string& campaign_id, int64_t now_ms,
                                           const std::optional<std::vector<int>>& cells = std::nullopt) = 0;
  // Marks a device's unfinished rows in other campaigns superseded; returns those campaign ids.
  virtual Result<std::vector<std::string>> supersede_others(const std::string& device_id,
                                                            const std::string& campaign_id, int64_t now_ms) = 0;
  // The desired state the hub released to a device (hub-local, ADR 16).
  virtual Status set_device_desired(const std::string& device_id, uint64_t generation,
                                    const std::string& bundle_id, const std::string& campaign_id) = 0;

  // The store commits with synchronous=FULL. Device reports are a cache the
  // devices rebuild by reporting again, so a report batch may relax it to
  // NORMAL (the WAL is then synced at the next FULL commit or checkpoint);
  // callers hold the store lock and set it back right after the commit.
  virtual Status relaxed_sync(bool relaxed) = 0;
  // The connection the cell's writes commit on (transactions, group commits).
  virtual sql::Db& device_db() = 0;
  // A directory change made to the device's rows here: a move counts its
  // campaign rows in its new cell, a decommission forgets its inventory.
  virtual Status follow_directory(const DirectoryChange& c) = 0;

  // A cell's own file (Store::open_cell, ADR 18 slice 7) holds a copy of
  // each of its devices' rows: the directory's columns as the directory
  // has them, the report columns as the device reported. Only such a file
  // takes these (another store answers an internal error: there the copy is
  // the directory's own row).
  // Makes or brings up to date the copy's directory columns (a new copy
  // starts as enrolled, or decommissioned if the directory says so);
  // writes nothing when they are already equal. The entry's cell must be
  // the file's.
  virtual Status adopt_device(const DeviceDirectoryEntry& e) = 0;
  // Drops the copy and every row of the device here (campaign rows,
  // inventory, failures); the counts follow. Nothing if there is none.
  virtual Status forget_device(const std::string& id) = 0;
  // The ids of the copies, in id order after `after`, up to limit.
  virtual Result<std::vector<std::string>> device_ids(const std::string& after, int64_t limit) = 0;
  // The campaigns this store holds rows of, and dropping one campaign's
  // rows (a campaign the directory's store does not have: its rows were
  // written first and the record never committed); returns the rows dropped.
  virtual Result<std::vector<std::string>> campaigns_with_rows() = 0;
  virtual Result<int64_t> forget_campaign_rows(const std::string& campaign_id) = 0;
  // A device's rows here (nullopt: no copy), and taking them into another
  // cell's file: the copy adopted from the entry, its reports, inventory
  // and campaign rows (each counted in the entry's cell, an existing row
  // of the same campaign replaced). A move imports, commits, and only then
  // forgets the rows in the old file.
  virtual Result<std::optional<DeviceRows>> export_device(const std::string& id) = 0;
  virtual Status import_device(const DeviceDirectoryEntry& e, const DeviceRows& rows) = 0;
};

class Store final : public DeviceStore {
 public:
  static Result<std::unique_ptr<Store>> open(const std::string& path, const StoreTuning& tuning = {});
  // The same store on a connection of its own that cannot write (query_only)
  // and does not migrate: what API reads use instead of waiting for the
  // writer's lock. The file must have been opened with open() first.
  static Result<std::unique_ptr<Store>> open_reader(const std::string& path, const StoreTuning& tuning = {});
  // A cell's own device file (ADR 18 slice 7: `<data-dir>/cells/<n>/devices.db`):
  // the same tables, but none of the directory's triggers (its label index,
  // counts and outbox are hub.db's), and campaign rows without a foreign key
  // to campaigns (the records are in hub.db). Each file records what it is
  // at its first open: opening hub.db as a cell's file, one cell's file as
  // another's, or a cell's file as hub.db (open) is refused.
  static Result<std::unique_ptr<Store>> open_cell(const std::string& path, int cell, const StoreTuning& tuning = {});
  // The cell whose file this is; -1 for hub.db (or a reader).
  int own_cell() const { return own_cell_; }
  // A read connection of hub.db leased together with a read connection of
  // each cell's file (AggregateStore::cell_readers), in cell order: where a
  // read through this one finds the device rows. Empty otherwise. Set and
  // cleared by whoever leased them, for as long as it holds them.
  void set_read_parts(std::vector<DeviceStore*> parts) { read_parts_ = std::move(parts); }
  const std::vector<DeviceStore*>& read_parts() const { return read_parts_; }

  // Tokens are stored only as SHA-256 hashes of their secret.
  Status insert_token(const std::string& kind, const TokenRecord& t, const std::string& secret_hash);
  Result<std::optional<TokenRecord>> find_token(const std::string& kind, const std::string& secret_hash);
  // Counts one use if the token has uses left; false when it is used up.
  Result<bool> claim_token_use(const std::string& id);
  Result<int64_t> count_tokens(const std::string& kind);
  // Access control (store/access_store.cpp).
  Result<std::vector<TokenRecord>> list_tokens(const std::string& kind);
  Result<std::optional<TokenRecord>> get_token(const std::string& kind, const std::string& id);
  Status revoke_token(const std::string& kind, const std::string& id);
  Status delete_credential(const std::string& username);
  Status set_device_labels(const std::string& id, const Labels& labels);
  // The directory's decommission: keeps the row (history, campaign rows).
  // Its outbox entry's follow (follow_directory) sets the reported state
  // "decommissioned", offline, and drops the inventory; save_device_state
  // never moves a device out of that state.
  Status mark_device_decommissioned(const std::string& id);
  Result<int64_t> append_audit(const AuditRecord& a);
  // Rows with id > after, oldest first; project "*" = every project's rows.
  Result<std::vector<AuditRecord>> list_audit(int64_t after, int64_t limit, const std::string& project);

  Status upsert_credential(const std::string& username, const std::string& mosquitto_hash);
  Result<std::vector<std::pair<std::string, std::string>>> credentials();

  Status upsert_enrolled_device(const DeviceRecord& d);
  Result<std::optional<DeviceRecord>> get_device(const std::string& id) override;
  // The device's directory entry alone (no report columns, no inventory).
  Result<std::optional<DeviceDirectoryEntry>> directory_entry(const std::string& id);
  // The directory's entries of one cell, in id order after `after`, up to limit.
  Result<std::vector<DeviceDirectoryEntry>> directory_entries(int cell, const std::string& after, int64_t limit);
  // Every campaign id the directory's store holds, in order.
  Result<std::vector<std::string>> campaign_ids();
  // hub.db whose device rows were moved into cells' own files
  // (move_rows_to_cell_files): into how many; 0 = they are here.
  Result<int> cell_files_in_use();
  // hub.db whose rows are in cells' files: its report-side triggers go
  // (migrate() makes some of them again at every open, so open() runs this),
  // and so do the device-list indexes (the files answer device pages).
  Status drop_report_side();
  // Every device, by id: the tests' brute-force answer. The API never loads
  // the fleet; it pages with AggregateStore::devices.
  Result<std::vector<DeviceRecord>> list_devices();
  // Streams what targeting needs of every device (id, project, whether it
  // was decommissioned, labels) from the directory's columns, without
  // building a million full records.
  Status each_device_target(
      const std::function<void(const std::string& id, const std::string& project, bool decommissioned,
                               const Labels& labels)>& f);
  // The same with each device's cell (membership of a cell's devices).
  Status each_device_target_cell(
      const std::function<void(const std::string& id, const std::string& project, bool decommissioned,
                               const Labels& labels, int cell)>& f);
  // DeviceStore: report and presence of devices.
  Status save_device_state(const DeviceRecord& d) override;
  Status set_gateway_devices_offline(const std::string& gateway, int64_t now_ms) override;
  Result<int64_t> set_all_devices_offline() override;
  Result<int64_t> set_cell_devices_offline(int cell) override;
  using CellCount = CellDeviceCount;
  // The directory's devices (decommissioned ones left out) by cell, in
  // cell order; `online` is left 0 (presence is the cells': online_by_cell,
  // merged with merge_cell_device_counts). Project "*" counts every project.
  Result<std::vector<CellCount>> cell_device_totals(const std::string& project = "*");
  Result<std::vector<CellCount>> online_by_cell(const std::string& project = "*") override;
  // Moves a device (and, for a gateway, every device behind it) to a cell;
  // returns the rows changed.
  Result<int64_t> set_device_cell(const std::string& id, int cell);
  // The device itself and, for a gateway, every device behind it.
  Result<std::vector<std::string>> devices_of_owner(const std::string& id);
  // The directory's changes not followed yet, oldest first, and forgetting
  // them once followed (up to and including `seq`).
  Result<std::vector<DirectoryChange>> directory_outbox(int64_t limit);
  Status forget_directory_changes(int64_t seq);
  // Runs `write`, a write of this hub to the directory inside the caller's
  // transaction, and marks the outbox entries it made as this hub's own
  // (DirectoryChange::local). The transaction holds the store's write lock,
  // so every entry made meanwhile is the write's.
  Status local_directory_write(const std::function<Status()>& write);
  Status follow_directory(const DirectoryChange& c) override;
  Result<std::vector<std::string>> cell_session_devices(int cell, int64_t limit,
                                                        const std::string& after = "") override;
  // The cells this hub was draining (a hub without shared cells keeps its
  // drains here, so a restart does not forget them): cell -> since (unix ms).
  Result<std::map<int, int64_t>> cell_drains();
  Status set_cell_drain(int cell, bool draining, int64_t since_ms);

  Status insert_bundle(const BundleRecord& b);
  Status update_bundle_signatures(const std::string& id, const std::string& envelope, int signatures);
  // By id or "name:version" (the latest upload of that name and version),
  // within project; project "*" looks in every project and refuses a
  // name:version that more than one project has (conflict): the caller must
  // then use the id.
  Result<std::optional<BundleRecord>> get_bundle(const std::string& id_or_name_version, bool with_envelope,
                                                 const std::string& project = "*");
  Result<std::optional<BundleRecord>> find_bundle_by_digest(const std::string& project, const std::string& digest,
                                                            bool with_envelope);
  // Every bundle of project ("*": all).
  Result<std::vector<BundleRecord>> list_bundles(const std::string& project = "*");

  // Campaigns (store/campaign_store.cpp). insert_campaign_record writes the
  // campaign alone (control data; its members' rows go to their cells'
  // stores: HubService::create_campaign); insert_campaign writes it and
  // every member's row into this one store in one transaction.
  using CampaignMember = hub::CampaignMember;
  Status add_campaign_member(const std::string& campaign_id, const CampaignMember& m, int64_t now_ms) override;
  Status insert_campaign_record(const CampaignRecord& c);
  Status insert_campaign(const CampaignRecord& c, const std::vector<CampaignMember>& members);
  Result<std::optional<CampaignRecord>> get_campaign(const std::string& id);
  Result<std::vector<CampaignRecord>> list_campaigns();
  Status update_campaign(const CampaignRecord& c);
  Result<std::vector<CampaignDeviceRecord>> campaign_devices(const std::string& campaign_id) override;
  Result<std::vector<CampaignDeviceRecord>> campaign_devices_with_status(
      const std::string& campaign_id, const std::vector<std::string>& statuses) override;
  Result<std::optional<CampaignDeviceRecord>> campaign_device(const std::string& campaign_id,
                                                              const std::string& device_id) override;
  Status save_campaign_device(const CampaignDeviceRecord& cd) override;
  Status start_deadline(const std::string& campaign_id, const std::string& device_id, int64_t budget_ms,
                        int64_t now_ms) override;
  // From the trigger-kept campaign_counts table: a few rows, whatever the
  // fleet size. Without a cell: the campaign's totals over every cell.
  Result<std::vector<CampaignCountRow>> campaign_counts(const std::string& campaign_id) override;
  Result<std::vector<CampaignCountRow>> campaign_counts(const std::string& campaign_id, int cell) override;
  // The cells that hold devices of the campaign, ascending.
  Result<std::vector<int>> campaign_cells(const std::string& campaign_id) override;
  // The same figures grouped from every device row (what the triggers must
  // agree with; tests compare the two), in total and for the devices now in
  // one cell.
  Result<std::vector<CampaignCountRow>> recount_campaign(const std::string& campaign_id);
  Result<std::vector<CampaignCountRow>> recount_campaign(const std::string& campaign_id, int cell) override;
  // Failed and rollback_failed rows by reason ("unknown" when empty).
  Result<std::map<std::string, int64_t>> failure_reasons(const std::string& campaign_id) override;
  Result<std::vector<std::string>> away_devices(const std::string& campaign_id, int64_t limit) override;
  Result<std::vector<CampaignDeviceRecord>> releasable(
      const std::string& campaign_id, int max_wave, bool online, int64_t limit, const std::string& zone = "",
      const std::optional<std::vector<int>>& cells = std::nullopt) override;
  Result<int64_t> expire_deadlines(const std::string& campaign_id, int64_t now_ms,
                                   const std::optional<std::vector<int>>& cells = std::nullopt) override;
  Result<std::vector<std::string>> supersede_others(const std::string& device_id, const std::string& campaign_id,
                                                    int64_t now_ms) override;
  Status set_device_desired(const std::string& device_id, uint64_t generation, const std::string& bundle_id,
                            const std::string& campaign_id) override;
  Status migrate_campaigns();
  Status migrate_campaign_counts();
  // The dashboard's read models (store/aggregate_store.cpp): fleet counts,
  // the label index, outcome history, inventory and campaign timelines.
  Status migrate_aggregates();
  Status migrate_inventory();
  Status migrate_cells();
  Status save_device_inventory(const std::string& device_id, const DeviceInventory& inv) override;
  // fleet_counts and directory_counts as kept by the triggers (rows with
  // n != 0), and the same figures grouped from every device row (what the
  // triggers must agree with).
  Result<std::vector<FleetCount>> fleet_counts();
  Result<std::vector<FleetCount>> recount_fleet();
  // The operator's trust message (a serialized v1::Trust), one for the whole
  // hub (store/trust_store.cpp); nullopt until one was stored.
  Status put_trust(const std::string& trust_bytes, int64_t now_ms);
  Result<std::optional<std::pair<std::string, int64_t>>> get_trust();

  // Declarative objects and Git repositories (store/declarative_store.cpp).
  Result<std::optional<AppliedObject>> get_applied(const std::string& kind, const std::string& project,
                                                   const std::string& name);
  // Every applied object ("" = all), or those of one apply set, by kind, project, name.
  Result<std::vector<AppliedObject>> list_applied(const std::string& apply_set, bool all_sets);
  Status put_applied(const AppliedObject& o);
  Status delete_applied(const std::string& kind, const std::string& project, const std::string& name);
  // A token's declared fields (name, role, labels, expiry, uses allowed).
  Status update_token(const TokenRecord& t);
  Status update_campaign_strategy(const std::string& id, const std::string& strategy_json);
  Result<std::optional<GitRepoRecord>> get_gitrepo(const std::string& name);
  Result<std::vector<GitRepoRecord>> list_gitrepos();
  // Creates or replaces the spec (url, branch, path, interval); a changed spec
  // clears the sync state so the next poll applies afresh.
  Status put_gitrepo(const GitRepoRecord& r);
  Status save_gitrepo_status(const GitRepoRecord& r);
  Status delete_gitrepo(const std::string& name);
  Result<std::vector<CampaignDeviceRecord>> campaign_failures(const std::string& campaign_id, int64_t limit) override;
  Status relaxed_sync(bool relaxed) override;
  // PRAGMA synchronous as SQLite reports it: 1 NORMAL, 2 FULL.
  Result<int64_t> synchronous();

  // Device certificates (store/cert_store.cpp).
  Status insert_device_cert(const DeviceCertRecord& c);
  // Revokes every certificate of the device not revoked yet; returns how many.
  Result<int64_t> revoke_device_certs(const std::string& device_id, int64_t now_ms);
  // Revoked certificates still valid at now_unix (what a CRL must list):
  // serial and when it was revoked (unix seconds).
  Result<std::vector<std::pair<std::string, int64_t>>> revoked_unexpired_certs(int64_t now_unix);
  // Forgets certificates that expired before before_unix (revoked or not):
  // an expired certificate opens no broker, so the table stays the size of
  // the live fleet.
  Result<int64_t> prune_device_certs(int64_t before_unix);
  // Ids of decommissioned devices (the hub drops what still arrives from them).
  Result<std::vector<std::string>> decommissioned_device_ids();
  // The replay floor enrollments and renewals share (DeviceRecord::enroll_issued_ms).
  Status set_enroll_issued_ms(const std::string& device_id, uint64_t issued_ms);
  // Whether the device still has a broker password (enrolled before certificates).
  Result<bool> has_credential(const std::string& username);

  sql::Db& db() { return *db_; }
  sql::Db& device_db() override { return *db_; }

  // A cell's own file (store/cell_store.cpp).
  Status adopt_device(const DeviceDirectoryEntry& e) override;
  Status forget_device(const std::string& id) override;
  Result<std::vector<std::string>> device_ids(const std::string& after, int64_t limit) override;
  Result<std::vector<std::string>> campaigns_with_rows() override;
  Result<int64_t> forget_campaign_rows(const std::string& campaign_id) override;
  Result<std::optional<DeviceRows>> export_device(const std::string& id) override;
  Status import_device(const DeviceDirectoryEntry& e, const DeviceRows& rows) override;

 private:
  explicit Store(std::unique_ptr<sql::Db> db) : db_(std::move(db)) {}
  // Records the file's role at its first open (cell -1: hub.db) and refuses
  // a file made for another.
  Status claim_role(const std::string& path, int cell);
  static Result<std::unique_ptr<Store>> open_writer(const std::string& path, const StoreTuning& tuning, int cell);
  // A cell's file: its campaign rows' table made before migrate() does
  // (without the key to campaigns), and the directory's triggers dropped after.
  Status prepare_cell_file();
  Status finish_cell_file();
  Status only_in_cell_file(const char* what) const;
  int own_cell_ = -1;
  // hub.db whose device rows are in cells' files: migrate() makes none of
  // the indexes only the report side reads.
  bool directory_only_ = false;
  std::vector<DeviceStore*> read_parts_;
  static Result<std::unique_ptr<Store>> open_tuned(const std::string& path, const StoreTuning& tuning,
                                                   bool read_only);
  Status migrate();
  Status migrate_declarative();
  // Columns and constraints of the security fixes: enrollment replay floor,
  // device-choosable label keys, bundles unique per (project, digest).
  Status migrate_scopes();
  Status migrate_directory();
  Status migrate_certs();
  std::unique_ptr<sql::Db> db_;
};

// Follows the directory's outbox (Store::directory_outbox) with the device
// rows of every change's cell store (`store_of`), and `labelled` changes
// with `on_labelled` (none: they are only forgotten), in order, then
// forgets what was followed, in batches; returns how many changes.
// With every cell's store in hub.db a batch is one transaction. With
// `cell_files` (each cell's store its own file, Store::open_cell) every
// change first brings the device's copy in the file of the cell the
// directory names now up to date (adopt_device), a move carries the
// device's rows there from its old cell's file, and the batch commits each
// file (the new files first, then the old ones the moved rows leave) before
// the entries are forgotten; following twice is harmless.
Result<int64_t> follow_directory_outbox(Store& directory, const std::function<DeviceStore&(int cell)>& store_of,
                                        const std::function<Status(const DirectoryChange&)>& on_labelled = {},
                                        bool cell_files = false);

// What move_rows_to_cell_files did.
struct CellFilesMove {
  bool already = false;  // hub.db's rows were in these files before
  int64_t devices = 0;   // devices whose rows went to their cell's file
  int64_t campaign_rows = 0;
};
// Moves hub.db's device rows (each device's report columns, inventory and
// campaign rows) into its cell's own file, files[i] being cell i's, in
// batches of 4,096 devices, one transaction per batch (imports are
// upserts: after a crash it simply runs again). Once every file committed,
// one hub.db transaction drops its report-side triggers, empties its
// report-side tables and records the number of files; from then on
// Store::open keeps those triggers dropped. Refused when hub.db's rows
// are already in another number of files, or a device's cell has no file.
// progress(cell, devices done in it) after each batch.
Result<CellFilesMove> move_rows_to_cell_files(Store& directory, const std::vector<DeviceStore*>& files,
                                              const std::function<void(int, int64_t)>& progress = {});

// What reconcile_cell_file did.
struct CellReconciliation {
  int64_t adopted = 0;    // copies made (or brought up to date) from the directory
  int64_t forgotten = 0;  // copies of devices the directory has in another cell, or not at all
  int64_t orphan_campaigns = 0;  // campaigns the directory's store does not have, their rows dropped
};
// "The directory decides" (ADR 18): makes a cell's own file hold exactly
// the directory's devices of that cell, and campaign rows only of campaigns
// the directory's store has. Run at open, before anything writes the file:
// it repairs what a crash between the steps of a move (rows in both files)
// or of a campaign's creation (rows written first, no record) left. A copy
// the directory already has is left as it is (its directory columns follow
// the outbox). Walks both sides in id order, `batch` ids at a time, one
// transaction of the cell's file per batch.
Result<CellReconciliation> reconcile_cell_file(Store& directory, int cell, DeviceStore& file, int64_t batch = 4096);

}  // namespace flotilla::hub
