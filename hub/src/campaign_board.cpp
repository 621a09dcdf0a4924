// Per-cell campaign counts through the coordinator, and the campaign leader
// (campaign_board.hpp, docs/adr/0017).
#include "flotilla/hub/campaign_board.hpp"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "flotilla/common/log.hpp"
#include "flotilla/hub/cell.hpp"
#include "flotilla/hub/merge.hpp"

namespace flotilla::hub {

namespace {

const std::shared_ptr<spdlog::logger>& blog() {
  static auto l = log::get("campaign");
  return l;
}

// A cell publishes at most this many rows (waves x statuses x presence):
// anything bigger is not a count we wrote.
constexpr size_t kMaxRows = 4096;

}  // namespace

std::string campaign_cells_prefix(const std::string& campaign) { return "/flotilla/campaigns/" + campaign + "/cells/"; }

std::string campaign_cell_key(const std::string& campaign, int cell) {
  return campaign_cells_prefix(campaign) + std::to_string(cell);
}

std::string CellCampaignCounts::encode() const {
  nlohmann::json rs = nlohmann::json::array();
  for (const auto& r : rows) rs.push_back({r.wave, r.status, r.online ? 1 : 0, r.count});
  return nlohmann::json{{"campaign", campaign}, {"cell", cell},       {"revision", revision},
                        {"updated_ms", updated_ms}, {"holder", holder}, {"rows", rs}}
      .dump();
}

Result<CellCampaignCounts> CellCampaignCounts::decode(const std::string& text) {
  auto j = nlohmann::json::parse(text, nullptr, false);
  auto bad = [](const std::string& why) { return make_error(Errc::invalid_argument, "cell counts: " + why); };
  if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");
  CellCampaignCounts c;
  try {
    c.campaign = j.at("campaign").get<std::string>();
    c.cell = j.at("cell").get<int>();
    c.revision = j.at("revision").get<int64_t>();
    c.updated_ms = j.at("updated_ms").get<int64_t>();
    c.holder = j.value("holder", "");
    const auto& rs = j.at("rows");
    if (!rs.is_array() || rs.size() > kMaxRows) return bad("rows is not an array of at most 4096");
    for (const auto& r : rs) {
      if (!r.is_array() || r.size() != 4) return bad("a row is not [wave, status, online, count]");
      CampaignCountRow row{r[0].get<int>(), r[1].get<std::string>(), r[2].get<int>() != 0, r[3].get<int64_t>()};
      if (row.count < 0 || row.wave < 0) return bad("negative wave or count");
      c.rows.push_back(std::move(row));
    }
  } catch (const nlohmann::json::exception& e) {
    return bad(e.what());
  }
  if (c.cell < 0 || c.cell >= kMaxCells) return bad("cell " + std::to_string(c.cell) + " out of range");
  return c;
}

CellSummary summarize(const std::vector<CampaignCountRow>& rows) {
  CellSummary s;
  for (const auto& r : rows) {
    s.total += r.count;
    if (r.status == "applied") s.applied += r.count;
    if (r.status == "failed") s.failed += r.count;
    if (r.status == "pending" || r.status == "in_progress") s.pending += r.count;
    if (r.online) s.online += r.count;
  }
  return s;
}

std::vector<CampaignCountRow> sum_cell_counts(const std::vector<CellCampaignCounts>& cells) {
  std::vector<std::vector<CampaignCountRow>> parts;
  parts.reserve(cells.size());
  for (const auto& c : cells) parts.push_back(c.rows);
  return sum_campaign_counts(parts);
}

CampaignBoard::CampaignBoard(coord::Coordinator& c, coord::CellOwnership& cells, const Clock& clock)
    : c_(c), cells_(cells), clock_(clock) {}

Result<bool> CampaignBoard::publish(const std::string& campaign, int cell, const std::vector<CampaignCountRow>& rows) {
  const std::string key = campaign_cell_key(campaign, cell);
  auto it = last_.find({campaign, cell});
  if (it == last_.end()) {
    // First publish by this process (a start, a takeover): continue the
    // cell's count revision, and write nothing if the counts are the same.
    CellCampaignCounts seen{campaign, cell, 0, 0, "", {}};
    auto cur = c_.get(key);
    if (!cur) return cur.error();
    if (*cur) {
      if (auto d = CellCampaignCounts::decode((*cur)->value); d && d->campaign == campaign && d->cell == cell) {
        seen = std::move(*d);
      }
    }
    it = last_.emplace(std::make_pair(campaign, cell), std::move(seen)).first;
    // Nothing there and nothing to say (no device of the campaign in the cell).
    if (it->second.revision == 0 && rows.empty()) return false;
    if (it->second.revision > 0 && it->second.rows == rows && it->second.holder == cells_.holder()) return false;
  } else if (it->second.rows == rows) {
    return false;
  }
  CellCampaignCounts next{campaign, cell, it->second.revision + 1, clock_.now_unix_ms(), cells_.holder(), rows};
  auto r = cells_.guarded_put(std::to_string(cell), key, next.encode());
  if (!r) {
    // Whatever the coordinator holds now is re-read before the next write.
    last_.erase(it);
    return r.error().with_context("publish counts of campaign " + campaign + " cell " + std::to_string(cell));
  }
  it->second = std::move(next);
  return true;
}

Result<std::vector<CellCampaignCounts>> CampaignBoard::read(const std::string& campaign) {
  auto r = c_.range(campaign_cells_prefix(campaign), static_cast<size_t>(kMaxCells));
  if (!r) return r.error();
  std::vector<CellCampaignCounts> out;
  for (const auto& kv : r->kvs) {
    auto d = CellCampaignCounts::decode(kv.value);
    if (!d || d->campaign != campaign || campaign_cell_key(campaign, d->cell) != kv.key) {
      blog()->warn("skipping counts key={}: {}", kv.key, d ? "key and contents disagree" : d.error().message);
      continue;
    }
    out.push_back(std::move(*d));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.cell < b.cell; });
  return out;
}

void CampaignBoard::forget(const std::string& campaign) {
  for (auto it = last_.begin(); it != last_.end();) {
    it = it->first.first == campaign ? last_.erase(it) : std::next(it);
  }
}

// ---- Leadership --------------------------------------------------------

Leadership::Leadership(coord::Coordinator& c, std::string holder, std::chrono::seconds ttl, const Clock& clock)
    : c_(c), holder_(std::move(holder)), ttl_(ttl), clock_(clock) {}

Status Leadership::lose(const std::string& why) {
  if (leading_) blog()->warn("campaign leadership lost holder={}: {}", holder_, why);
  leading_ = false;
  lease_ = 0;
  return {};
}

Result<bool> Leadership::tick() {
  const auto now = clock_.monotonic();
  if (leading_) {
    if (now - last_renew_ < ttl_ / 3) return true;
    auto r = c_.keep_alive(lease_);
    if (!r) {
      if (r.error().code == Errc::not_found) {
        (void)lose("lease expired");
      } else if (now - last_renew_ >= ttl_) {
        // Unreachable past the TTL: another instance may lead by now.
        (void)lose(r.error().message);
        return r.error();
      } else {
        return r.error();
      }
    } else {
      // Still our key? (It could only be gone if the lease was revoked.)
      auto cur = c_.get(kKey);
      if (!cur) return cur.error();
      if (!*cur || (*cur)->lease != lease_) {
        (void)lose("the leader key is gone");
      } else {
        last_renew_ = now;
        return true;
      }
    }
  }
  // A follower keeps its lease alive too (on the same schedule), so it can
  // take the key the moment it is free.
  if (lease_ != 0 && now - last_renew_ >= ttl_ / 3) {
    auto r = c_.keep_alive(lease_);
    if (!r) {
      if (r.error().code != Errc::not_found) return r.error();
      lease_ = 0;
    } else {
      last_renew_ = now;
    }
  }
  if (lease_ == 0) {
    auto l = c_.grant_lease(ttl_);
    if (!l) return l.error().with_context("campaign leadership: grant lease");
    lease_ = l->id;
    last_renew_ = now;
  }
  auto rev = c_.create(kKey, holder_, lease_);
  if (!rev) {
    if (rev.error().code != Errc::already_exists) return rev.error();
    auto cur = c_.get(kKey);
    if (!cur) return cur.error();
    if (!*cur || (*cur)->value != holder_) return false;
    if ((*cur)->lease == lease_) {
      // Ours already (a create whose answer was lost): lead at its revision.
      rev = (*cur)->mod_revision;
    } else {
      // Ours from before a restart: take it over under the new lease.
      auto swapped = c_.compare_and_swap(kKey, (*cur)->mod_revision, holder_, lease_);
      if (!swapped) return swapped.error().code == Errc::conflict ? Result<bool>(false) : Result<bool>(swapped.error());
      rev = *swapped;
    }
  }
  key_revision_ = *rev;
  leading_ = true;
  last_renew_ = now;
  blog()->info("campaign leader holder={} lease={}", holder_, lease_);
  return true;
}

std::vector<coord::Compare> Leadership::guard() const {
  if (!leading_ || lease_ == 0 || key_revision_ <= 0) return {};
  return {coord::Compare::lease_is(kKey, lease_), coord::Compare::mod_revision_is(kKey, key_revision_)};
}

Status Leadership::resign() {
  if (lease_ == 0) return {};
  auto s = c_.revoke_lease(lease_);
  leading_ = false;
  lease_ = 0;
  return s;
}

Result<coord::Fence> reclaim_own_cell(coord::Coordinator& c, coord::CellOwnership& cells, const std::string& cell) {
  auto f = cells.claim(cell);
  if (f || f.error().code != Errc::already_exists) return f;
  const std::string key = coord::CellOwnership::owner_key(cell);
  auto cur = c.get(key);
  if (!cur) return cur.error();
  if (!*cur || (*cur)->value != cells.holder()) return f;
  // Only the key exactly as read: a successor's new key is never removed.
  auto r = c.txn({coord::Compare::mod_revision_is(key, (*cur)->mod_revision)}, {coord::Op::remove(key)});
  if (!r) return r.error();
  blog()->info("taking back cell={} from an earlier run of holder={}", cell, cells.holder());
  return cells.claim(cell);
}

double canary_cut(const std::vector<std::vector<double>>& lowest_ranks_per_cell, int64_t count) {
  if (count <= 0) return -1;
  std::vector<double> all;
  for (const auto& cell : lowest_ranks_per_cell) all.insert(all.end(), cell.begin(), cell.end());
  if (static_cast<int64_t>(all.size()) < count) return 1.0;
  std::nth_element(all.begin(), all.begin() + (count - 1), all.end());
  return all[static_cast<size_t>(count - 1)];
}

}  // namespace flotilla::hub
