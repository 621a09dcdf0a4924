// Campaigns across cells (docs/architecture.md, "Campaigns across cells";
// docs/adr/0017): which cells this hub owns, publishing their counts, and
// the totals the campaign leader decides on.
#include <algorithm>

#include "flotilla/common/log.hpp"
#include "flotilla/hub/service.hpp"

namespace flotilla::hub {

bool HubService::in_cells(const CellFilter& cells, int cell) {
  return !cells || std::find(cells->begin(), cells->end(), cell) != cells->end();
}

HubService::CellFilter HubService::cell_filter() const {
  std::lock_guard lock(coord_mu_);
  return owned_;
}

std::vector<int> HubService::owned_cells() const {
  auto f = cell_filter();
  if (f) return *f;
  std::vector<int> all;
  for (int i = 0; i < cell_count(); ++i) all.push_back(i);
  return all;
}

void HubService::coordinate() {
  if (!cfg_.coordinator) return;
  std::lock_guard lock(coord_mu_);
  auto logger = log::get("hub");
  auto warn = [&](const std::string& what, const Error& e) {
    if (auto dropped = log_limit_.admit("coordination " + what)) {
      logger->warn("coordination: {}: {} (suppressed={})", what, e.message, *dropped);
    }
  };
  if (!ownership_) {
    ownership_ = std::make_unique<coord::CellOwnership>(*cfg_.coordinator, cfg_.coord_holder, cfg_.coord_ttl, clock_);
    board_ = std::make_unique<CampaignBoard>(*cfg_.coordinator, *ownership_, clock_);
    leadership_ = std::make_unique<Leadership>(*cfg_.coordinator, cfg_.coord_holder, cfg_.coord_ttl, clock_);
  }
  if (ownership_->lease() == 0) {
    if (auto s = ownership_->start(); !s) warn("cell lease", s.error());
  } else if (auto s = ownership_->tick(); !s) {
    warn("renew cell lease", s.error());
  }
  std::vector<int> want = cfg_.claim_cells;
  if (want.empty()) {
    for (int i = 0; i < cell_count(); ++i) want.push_back(i);
  }
  if (ownership_->lease() != 0) {
    for (int cell : want) {
      if (ownership_->fence(std::to_string(cell))) continue;
      auto f = reclaim_own_cell(*cfg_.coordinator, *ownership_, std::to_string(cell));
      if (!f && f.error().code != Errc::already_exists) warn("claim cell " + std::to_string(cell), f.error());
    }
  }
  std::vector<int> owned;
  for (const auto& cell : ownership_->cells()) {
    const int id = std::stoi(cell);
    if (id >= 0 && id < cell_count()) owned.push_back(id);
  }
  std::sort(owned.begin(), owned.end());
  // Owning every cell there is: no filter at all, so the store's queries are
  // exactly those of a hub without cells.
  bool all = static_cast<int>(owned.size()) == cell_count();
  if (all) {
    owned_.reset();
  } else {
    owned_ = std::move(owned);
  }
  auto lead = leadership_->tick();
  if (!lead) warn("campaign leadership", lead.error());
  leader_ = leadership_->leading();
}

Result<std::vector<CellCampaignCounts>> HubService::cell_counts(const std::string& campaign_id) {
  const CellFilter own = cell_filter();
  std::vector<int> local;
  if (own) {
    local = *own;
  } else {
    auto present = store_.campaign_cells(campaign_id);
    if (!present) return present.error();
    local = std::move(*present);
  }
  std::vector<CellCampaignCounts> out;
  const int64_t now = clock_.now_unix_ms();
  for (int cell : local) {
    auto rows = store_.campaign_counts(campaign_id, cell);
    if (!rows) return rows.error();
    if (rows->empty()) continue;
    out.push_back({campaign_id, cell, 0, now, cfg_.coord_holder, std::move(*rows)});
  }
  if (own) {
    // The cells of other hubs, as they published them.
    std::lock_guard lock(coord_mu_);
    if (board_) {
      auto published = board_->read(campaign_id);
      if (!published) return published.error();
      for (auto& p : *published) {
        if (!in_cells(own, p.cell)) out.push_back(std::move(p));
      }
    }
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.cell < b.cell; });
  return out;
}

Result<std::vector<CampaignCountRow>> HubService::campaign_totals(const std::string& campaign_id) {
  // Owning every cell, the totals are the store's own (one query, as before cells).
  if (!cell_filter()) return store_.campaign_counts(campaign_id);
  auto cells = cell_counts(campaign_id);
  if (!cells) return cells.error();
  return sum_cell_counts(*cells);
}

void HubService::publish_cell_counts(const std::string& campaign_id) {
  if (!cfg_.coordinator) return;
  const std::vector<int> own = owned_cells();
  std::lock_guard lock(coord_mu_);
  if (!board_) return;
  for (int cell : own) {
    auto rows = store_.campaign_counts(campaign_id, cell);
    if (!rows) continue;
    auto r = board_->publish(campaign_id, cell, *rows);
    if (!r) {
      if (auto dropped = log_limit_.admit("publish counts")) {
        log::get("hub")->warn("campaign={} cell={}: {} (suppressed={})", campaign_id, cell, r.error().message,
                              *dropped);
      }
    }
  }
}

}  // namespace flotilla::hub
