#pragma once
// Read models for the dashboard (and any other reader of the fleet at
// scale): every figure is computed in SQL from trigger-kept counts or from
// an index walk with a bounded number of rows, on connections of their own,
// so a page never loads the fleet and a reader never waits for the report
// worker's lock (it reads the last committed state: SQLite's WAL mode).
// The tables and triggers behind it are created by Store::migrate_aggregates
// (store/aggregate_store.cpp); docs/architecture.md, "Dashboard".
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "flotilla/common/clock.hpp"
#include "flotilla/common/result.hpp"
#include "flotilla/common/sqlite.hpp"
#include "flotilla/hub/store.hpp"

namespace flotilla::hub {

// The order of a device list. Every one walks an index that reports never
// rewrite (ids, hostnames and enrollment times are written at enrollment;
// certificate expiry only when a device's inventory changes).
enum class DeviceSort { id, hostname, enrolled, cert_expiry };
std::string sort_name(DeviceSort s);
std::optional<DeviceSort> parse_device_sort(const std::string& s);

// Agent states that mean trouble; the device_trouble table holds exactly
// these devices, so a filter on them reads only them.
bool is_trouble_state(const std::string& state);

// Certificates by expiry, from the counted days of one dimension:
// cert_day (k3s serving certificates, from inventories) or broker_cert_day
// (the broker client certificates the device CA issued). A day holds the
// certificates expiring during that UTC day: `expired` counts the days
// before today, today's count as within 7 days. The dashboard and /metrics
// both count this way.
struct CertExpiryCounts {
  int64_t expired = 0, within_7_days = 0, within_30_days = 0, later = 0;
};
CertExpiryCounts cert_expiry_counts(const std::vector<FleetCount>& rows, const std::string& dim, int64_t now_unix);

struct DeviceQuery {
  std::string project = "*";  // "*" = every project
  Selector selector;          // empty = every device
  std::string state;          // "" = any
  std::optional<bool> online;
  std::optional<std::string> bundle;   // applied bundle name; "" = none applied yet
  std::optional<uint64_t> version;     // with bundle: that version only
  std::optional<std::string> k3s;      // "" = not reported
  // Starting with "d-": a device id prefix; otherwise a hostname prefix. It
  // decides the order (by id or by hostname).
  std::string text;
  std::optional<int64_t> cert_before_unix;  // k3s certificate expires before this (reported ones only)
  bool include_decommissioned = false;
  DeviceSort sort = DeviceSort::id;
  bool descending = false;
  std::string after;  // DevicePage::next of the previous page
  // The REST list's walk (GET /v1/devices): always in id order, the
  // certificate filter included, continuing after a plain device id (`after`
  // must then be empty).
  bool id_order = false;
  std::string after_id;
  // With id_order: up to and including this id ("" = to the end).
  std::string until_id;
  // Only devices of these cells (hub processes sharing cells: the ones this
  // hub holds); nullopt = every cell.
  std::optional<std::vector<int>> cells;
  int64_t limit = 50;
  // Rows one request may examine. A filter that no index serves stops here
  // and says so (complete = false with fewer than `limit` items): the next
  // request carries on where this one stopped.
  int64_t scan_limit = 200000;
};

struct DevicePage {
  std::vector<DeviceRecord> items;
  std::string next;        // "" = nothing after this page
  std::string next_id;     // with next: the id of the last row examined
  int64_t scanned = 0;     // rows examined
  bool complete = false;   // the walk reached the end of the rows that could match
  DeviceSort sort = DeviceSort::id;
  bool descending = false;
  std::string index;       // the index that drove the walk
};

// A failure as a device's report told it (device_events: a report that
// ended in failed, rolled_back or refused, or brought a new failure reason;
// the last kDeviceOutcomesKept per device).
struct DeviceOutcome {
  int64_t time_ms = 0;
  uint64_t seq = 0;
  std::string state, reason, message, campaign_id, bundle_id, applied_bundle;
  uint64_t applied_version = 0;
};
inline constexpr int kDeviceOutcomesKept = 10;

struct DeviceCampaignRow {
  CampaignDeviceRecord row;
  std::string campaign_name, campaign_state, bundle_name;
  uint64_t bundle_version = 0;
};

struct DeviceDetail {
  DeviceRecord device;
  std::optional<DeviceInventory> inventory;
  std::vector<DeviceOutcome> failures;         // newest first
  std::vector<DeviceCampaignRow> campaigns;    // newest first, at most 50
};

struct CampaignSummary {
  CampaignRecord campaign;
  std::string bundle_name, bundle_channel;
  uint64_t bundle_version = 0;
  std::vector<CampaignCountRow> counts;  // from campaign_counts
};

struct CampaignPage {
  std::vector<CampaignSummary> items;
  std::string next;
};

// Failed devices of a campaign by reason, each with its first devices.
struct FailureGroup {
  std::string reason;
  int64_t count = 0;
  struct Device {
    std::string id, message;
    int64_t updated_ms = 0;
  };
  std::vector<Device> first;
};

// One sample of a campaign's counts (campaign_samples).
struct TimelinePoint {
  int64_t time_ms = 0;
  std::string state;
  int64_t total = 0, waiting = 0, in_flight = 0, applied = 0, failed = 0, rolled_back = 0, other = 0, offline = 0;
};

struct BundlePage {
  std::vector<BundleRecord> items;
  std::string next;
};

struct AuditPage {
  std::vector<AuditRecord> items;
  int64_t next_before = 0;  // 0 = nothing older
};

class AggregateStore {
 public:
  struct Config {
    StoreTuning tuning{16, 0};  // per connection
    int readers = 3;            // concurrent read connections
    // Timeline points kept per campaign: past this, every other older
    // point is dropped, so a long campaign keeps its whole span at a coarser
    // grain.
    int64_t max_samples = 720;
    // Rows one device-list request may examine (DeviceQuery::scan_limit).
    int64_t device_scan_limit = 200000;
    // Cell i's own device file (ADR 18, slice 7: Store::open_cell), each
    // with `readers` connections of its own; empty = the device rows are in
    // hub.db. With them, every read of device rows asks each file and
    // merges the answers (merge.hpp); hub.db answers for the directory
    // (labels' counts, which cell a device is in) and the control data.
    std::vector<std::string> cell_files;
  };
  static Result<std::unique_ptr<AggregateStore>> open(const std::string& path, const Config& cfg);
  ~AggregateStore();

  // The fleet's counts (fleet_counts and directory_counts) summed over the
  // caller's project ("*" = all).
  Result<std::vector<FleetCount>> fleet(const std::string& project);
  // One page of a device walk: each store's walk (one store today, one per
  // cell's when they are split: ADR 18), merged by merge_device_pages.
  Result<DevicePage> devices(const DeviceQuery& q);
  Result<std::optional<DeviceDetail>> device(const std::string& id);
  // Newest first; state "" = any.
  Result<CampaignPage> campaigns(const std::string& project, const std::string& state, const std::string& after,
                                 int64_t limit);
  Result<std::optional<CampaignSummary>> campaign(const std::string& id);
  Result<std::vector<FailureGroup>> failure_groups(const std::string& campaign_id, int64_t max_reasons,
                                                   int64_t per_reason);
  // Unfinished devices of the campaign that are offline, by id. The counts
  // (the campaign's offline and unfinished devices, the fleet's offline
  // devices) choose the shorter walk.
  Result<std::vector<std::string>> away(const std::string& campaign_id, int64_t limit, int64_t campaign_offline,
                                        int64_t campaign_unfinished, int64_t fleet_offline);
  Result<std::vector<TimelinePoint>> timeline(const std::string& campaign_id);
  // Newest first.
  Result<BundlePage> bundles(const std::string& project, const std::string& after, int64_t limit);
  // Newest first: rows with id < before (0 = from the newest).
  Result<AuditPage> audit(const std::string& project, int64_t before, int64_t limit);
  // The API or enrollment token whose secret hashes to secret_hash: what
  // authenticates every API call, read without waiting for the store's writer.
  Result<std::optional<TokenRecord>> token(const std::string& kind, const std::string& secret_hash);
  // Devices whose last inventory said their clock looked wrong (not decommissioned).
  Result<int64_t> clock_suspect_devices();

  // One timeline point for every campaign the engine still runs, and a last
  // one for a campaign that ended since the previous call; thins a
  // campaign's points to max_samples. Also drops fleet_counts rows at 0.
  Status sample_campaigns(int64_t now_ms);
  // Calls sample_campaigns every interval on a thread of its own, until stop().
  void start_sampler(const Clock& clock, std::chrono::milliseconds interval);
  void stop();
  std::chrono::milliseconds sample_interval() const { return interval_; }
  int64_t device_scan_limit() const { return cfg_.device_scan_limit; }

  struct Pool;
  // One of the read connections for as long as it lives: a Store that
  // cannot write and sees what is committed, without waiting for the
  // writer. Waits while every connection is leased.
  class Lease {
   public:
    Lease(Pool& p, std::unique_ptr<Store> s);
    Lease(Lease&& o) noexcept;
    ~Lease();
    Store& store() { return *store_; }
    sql::Db& db() { return store_->db(); }

   private:
    Pool& pool_;
    std::unique_ptr<Store> store_;
  };
  Lease reader();
  // One read connection of each cell's file, in cell order; none when the
  // device rows are in hub.db. Take hub.db's (reader()) first when both are
  // needed: every caller leasing in that order keeps them from waiting on
  // each other for good.
  std::vector<Lease> cell_readers();

 private:
  AggregateStore() = default;
  // The connections holding device rows: each cell's file, else hub.db's
  // (`hub`: a lease the caller holds, or the sampler's connection).
  static std::vector<sql::Db*> device_dbs(sql::Db& hub, std::vector<Lease>& cells);
  Result<DevicePage> walk_devices(sql::Db& db, const DeviceQuery& q);
  std::unique_ptr<Pool> pool_;
  std::vector<std::unique_ptr<Pool>> cell_pools_;
  std::unique_ptr<sql::Db> writer_;  // the sampler's connection
  std::mutex writer_mu_;
  Config cfg_;
  int64_t last_sample_ms_ = 0;  // writer_mu_
  std::chrono::milliseconds interval_{5000};
  std::thread sampler_;
  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;
};

}  // namespace flotilla::hub
