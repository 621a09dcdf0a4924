#pragma once
// Campaigns across cells (docs/architecture.md, "Campaigns across cells";
// docs/adr/0017): each cell keeps its own counts of every campaign (the
// store's trigger-kept campaign_counts, per cell) and its owner publishes
// them to the coordinator, fenced by the cell's ownership token; one elected
// leader sums the latest counts of every cell and makes the decisions that
// need the totals (thresholds, wave completion, soak, approval gates,
// pause/abort/complete/rollback).
//
// Keys: /flotilla/campaigns/<campaign>/cells/<cell> — one per cell, so a
// cell that publishes twice is counted once (the latest wins), and a hub
// that lost the cell cannot write there any more (its fence is stale).
// /flotilla/leader — the leader, created if absent under its own lease.
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "flotilla/common/clock.hpp"
#include "flotilla/common/result.hpp"
#include "flotilla/hub/coord.hpp"
#include "flotilla/hub/store.hpp"

namespace flotilla::hub {

// One cell's counts of one campaign, as the cell's owner published them.
struct CellCampaignCounts {
  std::string campaign;
  int cell = 0;
  int64_t revision = 0;    // the cell's count revision: one more each time they changed
  int64_t updated_ms = 0;  // when they were published (or read, for a cell counted here)
  std::string holder;      // the hub process that published them
  std::vector<CampaignCountRow> rows;  // by wave, status and presence, as Store::campaign_counts

  std::string encode() const;
  // Checks shape and bounds: a value that is not ours is an error, never counted.
  static Result<CellCampaignCounts> decode(const std::string& text);
};

// The summary of a cell's rows the API shows.
struct CellSummary {
  int64_t total = 0, applied = 0, failed = 0, pending = 0, online = 0;
};
CellSummary summarize(const std::vector<CampaignCountRow>& rows);

std::string campaign_cells_prefix(const std::string& campaign);
std::string campaign_cell_key(const std::string& campaign, int cell);

// The totals over cells: every cell once, rows with the same (wave, status,
// online) added up, in the order Store::campaign_counts gives.
std::vector<CampaignCountRow> sum_cell_counts(const std::vector<CellCampaignCounts>& cells);

// Publishing and reading per-cell counts. Not thread-safe: one engine drives it.
class CampaignBoard {
 public:
  CampaignBoard(coord::Coordinator& c, coord::CellOwnership& cells, const Clock& clock);

  // Writes the cell's counts when they differ from its latest published
  // ones (true when written), as a guarded write under the cell's fence:
  // refused (Errc::refused, "stale fence" / "not owned") when this process
  // does not hold the cell, and then nothing is written.
  Result<bool> publish(const std::string& campaign, int cell, const std::vector<CampaignCountRow>& rows);
  // The latest counts of every cell of a campaign, by cell. A value that
  // does not decode, or whose key and contents disagree, is skipped (logged).
  Result<std::vector<CellCampaignCounts>> read(const std::string& campaign);
  // Forgets what this process published for a campaign (it is no longer ticked).
  void forget(const std::string& campaign);

 private:
  coord::Coordinator& c_;
  coord::CellOwnership& cells_;
  const Clock& clock_;
  // What each cell published last, as this process knows it.
  std::map<std::pair<std::string, int>, CellCampaignCounts> last_;
};

// The campaign leader: /flotilla/leader, created if absent under a lease of
// its own and kept alive; taken by another instance once that lease expires.
// A holder name is one hub process; a restarted process takes its own key
// back at once instead of waiting for its old lease to run out.
class Leadership {
 public:
  static constexpr const char* kKey = "/flotilla/leader";
  Leadership(coord::Coordinator& c, std::string holder, std::chrono::seconds ttl, const Clock& clock);
  // Renews (every TTL/3) or campaigns for the key; true while leading. With
  // the coordinator unreachable it keeps leading only until its lease would
  // have expired: past that another instance may lead.
  Result<bool> tick();
  bool leading() const { return leading_; }
  // What a leader's decision depends on, for a control write to check in the
  // same transaction: the leader key still held under this lease at the
  // revision this instance wrote it. Empty when not leading.
  std::vector<coord::Compare> guard() const;
  const std::string& holder() const { return holder_; }
  // Gives the key up (revokes the lease), for a clean stop.
  Status resign();

 private:
  Status lose(const std::string& why);
  coord::Coordinator& c_;
  std::string holder_;
  std::chrono::seconds ttl_;
  const Clock& clock_;
  coord::LeaseId lease_ = 0;
  int64_t key_revision_ = 0;  // the leader key's mod revision as this instance wrote it
  bool leading_ = false;
  std::chrono::steady_clock::time_point last_renew_{};
};

// Takes back a cell whose owner key names this holder but carries another
// lease: the same hub process before a restart. Anyone else's key is left
// alone (already_exists).
Result<coord::Fence> reclaim_own_cell(coord::Coordinator& c, coord::CellOwnership& cells, const std::string& cell);

// Count-based canaries need every cell's devices: each cell reports the
// ranks of its lowest `count` members, and the cut is the count-th lowest of
// them all (members with rank <= cut are the canary); 1.0 (above every
// rank) when there are fewer than `count` members in all.
double canary_cut(const std::vector<std::vector<double>>& lowest_ranks_per_cell, int64_t count);

}  // namespace flotilla::hub
