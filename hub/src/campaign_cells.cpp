// Campaigns across cells (docs/architecture.md, "Campaigns across cells";
// docs/adr/0017): which cells this hub owns, publishing their counts, and
// the totals the campaign leader decides on.
#include <algorithm>
#include <functional>
#include <limits>
#include <set>

#include "flotilla/common/log.hpp"
#include "flotilla/hub/merge.hpp"
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
  if (ownership_->lease() != 0 && cfg_.share_cells) {
    balance_cells(warn);
    follow_drains(warn);
  } else if (ownership_->lease() != 0) {
    for (int cell : want) {
      if (ownership_->fence(std::to_string(cell))) continue;
      auto f = reclaim_own_cell(*cfg_.coordinator, *ownership_, std::to_string(cell));
      if (!f && f.error().code != Errc::already_exists) warn("claim cell " + std::to_string(cell), f.error());
    }
  }
  if (ownership_->lease() == 0) announced_lease_ = 0;
  std::vector<int> owned;
  for (const auto& cell : ownership_->cells()) {
    const int id = std::stoi(cell);
    if (id >= 0 && id < cell_count()) owned.push_back(id);
  }
  std::sort(owned.begin(), owned.end());
  uint64_t mask = 0;
  for (int id : owned) mask |= uint64_t{1} << id;  // kMaxCells is 64
  // Not confirmed for a whole TTL (etcd unreachable from here): another hub
  // may hold these cells by now, so this one stops serving them (its
  // sessions close; reports wait in the brokers) until etcd confirms again.
  if (cfg_.share_cells && clock_.monotonic() - ownership_->last_renewed() > cfg_.coord_ttl) {
    if (mask != 0 && served_mask_.load() != 0) {
      logger->warn("cell lease not confirmed for {}s: serving no cell until etcd answers", cfg_.coord_ttl.count());
    }
    mask = 0;
  }
  const uint64_t before = served_mask_.exchange(mask);
  for (int id = 0; id < cell_count(); ++id) {
    // Taken over mid-drain (or first served since this process started):
    // the moves asked so far were not this process's.
    Cell& c = *cells_[static_cast<size_t>(id)];
    if (((mask & ~before) >> id & 1u) && c.draining()) c.drain_inherited = true;
  }
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

namespace {
// /flotilla/hubs/<holder>: one key per live hub process sharing the cells,
// under its cell lease, so a hub that dies leaves the count with its cells.
constexpr const char* kHubsPrefix = "/flotilla/hubs/";
}  // namespace

void HubService::balance_cells(const std::function<void(const std::string&, const Error&)>& warn) {
  coord::CellOwnership& own = *ownership_;
  auto logger = log::get("hub");
  if (announced_lease_ != own.lease()) {
    // Its REST base URL, for the other hubs to forward device reads to.
    const std::string announce = nlohmann::json{{"holder", cfg_.coord_holder}, {"api", cfg_.public_url}}.dump();
    if (auto p = cfg_.coordinator->put(kHubsPrefix + cfg_.coord_holder, announce, own.lease()); !p) {
      return warn("announce this hub", p.error());
    }
    announced_lease_ = own.lease();
  }
  // Cells whose key is gone or someone else's now: served no more from here.
  if (auto lost = own.verify(); !lost) {
    return warn("verify cells", lost.error());
  } else {
    for (const auto& cell : *lost) logger->warn("cell={} is no longer ours: stopped serving it", cell);
  }
  auto hubs = cfg_.coordinator->range(kHubsPrefix, coord::kMaxRangeLimit);
  if (!hubs) return warn("count hubs", hubs.error());
  const int live = std::max<int>(1, static_cast<int>(hubs->kvs.size()));
  const int share = (cell_count() + live - 1) / live;
  auto mine = own.cells();
  if (static_cast<int>(mine.size()) > share) {
    // More than a fair share (another hub came): one cell a round goes
    // back, the highest, for a hub below its share to take.
    std::string give = mine.front();
    for (const auto& c : mine) {
      if (std::stoi(c) > std::stoi(give)) give = c;
    }
    if (auto s = own.release(give); !s) return warn("release cell " + give, s.error());
    logger->info("released cell={} hubs={} share={}: another hub takes it", give, live, share);
    return;
  }
  // Free cells up to the share (any orphan once its owner's lease expired),
  // from a place of this hub's own so that starting hubs seldom race.
  const size_t start = std::hash<std::string>{}(cfg_.coord_holder) % static_cast<size_t>(cell_count());
  for (int k = 0; k < cell_count() && static_cast<int>(own.cells().size()) < share; ++k) {
    const std::string cell = std::to_string((start + static_cast<size_t>(k)) % static_cast<size_t>(cell_count()));
    if (own.fence(cell)) continue;
    auto f = reclaim_own_cell(*cfg_.coordinator, own, cell);
    if (f) {
      // Nobody in it is released before its broker session begins and the
      // roll call is answered (that session sets the real deadline): until
      // then this hub does not know what its devices run.
      cells_[static_cast<size_t>(std::stoi(cell))]->settle_until_ms = std::numeric_limits<int64_t>::max();
      logger->info("took cell={} hubs={} share={}", cell, live, share);
    } else if (f.error().code != Errc::already_exists) {
      warn("claim cell " + cell, f.error());
    }
  }
}

std::map<int, std::string> HubService::cell_owner_urls() {
  std::map<int, std::string> urls;
  if (!cfg_.share_cells || !cfg_.coordinator) return urls;
  auto owners = cfg_.coordinator->range(coord::CellOwnership::kOwnersPrefix, coord::kMaxRangeLimit);
  auto hubs = cfg_.coordinator->range(kHubsPrefix, coord::kMaxRangeLimit);
  if (!owners || !hubs) return urls;
  std::map<std::string, std::string> api;  // holder -> its REST base URL
  for (const auto& kv : hubs->kvs) {
    const auto j = nlohmann::json::parse(kv.value, nullptr, false);
    if (j.is_object() && j.contains("api") && j["api"].is_string()) {
      api[kv.key.substr(std::string_view(kHubsPrefix).size())] = j["api"].get<std::string>();
    }
  }
  for (const auto& kv : owners->kvs) {
    const auto cell = coord::CellOwnership::cell_of_owner_key(kv.key);
    if (!cell || kv.value == cfg_.coord_holder) continue;
    if (auto it = api.find(kv.value); it != api.end()) urls[*cell] = it->second;
  }
  return urls;
}

std::string HubService::cell_owner_url(int cell) {
  const auto urls = cell_owner_urls();
  const auto it = urls.find(cell);
  return it == urls.end() ? "" : it->second;
}

Result<std::map<int, int64_t>> HubService::shared_drains() {
  auto drains = cfg_.coordinator->range(kDrainsPrefix, coord::kMaxRangeLimit);
  if (!drains) return drains.error();
  std::map<int, int64_t> cells;
  for (const auto& kv : drains->kvs) {
    const auto cell = coord::CellOwnership::parse_cell_id(std::string_view(kv.key).substr(
        std::string_view(kDrainsPrefix).size()));
    if (cell && *cell < cell_count()) cells[*cell] = kv.create_revision;
  }
  return cells;
}

void HubService::follow_drains(const std::function<void(const std::string&, const Error&)>& warn) {
  auto drains = shared_drains();
  if (!drains) return warn("read the draining cells", drains.error());
  for (const auto& [cell, since] : *drains) {
    Cell& c = *cells_[static_cast<size_t>(cell)];
    if (c.draining()) continue;
    // The moves are this process's own only when it held the cell before
    // the drain began (its claim is older than the drain's key: etcd
    // revisions, so no clocks are compared); otherwise a holder before it
    // may have asked some.
    const auto fence = ownership_->fence(std::to_string(cell));
    c.drain_inherited = !serves_cell(cell) || !fence || fence->revision > since;
    c.set_draining(true);
    log::get("hub")->info("cell {} draining (the drain is in the coordinator)", cell);
    engine_cv_.notify_one();
  }
  // A drain stopped by any process: its key is gone.
  for (auto& c : cells_) {
    if (c->draining() && !drains->count(c->id())) stop_drain(*c, "its drain is no longer in the coordinator");
  }
}

void HubService::record_arrivals() {
  // One worker at a time (each calls this after its batches), and after a
  // failure not again for a while: a control write holds the store while it
  // waits for etcd, and with etcd away the reports must go on meanwhile.
  if (recording_arrivals_.exchange(true)) return;
  struct Done {
    std::atomic<bool>& flag;
    ~Done() { flag = false; }
  } done{recording_arrivals_};
  const int64_t now = clock_.now_unix_ms();
  std::map<std::string, std::pair<int, int>> arrivals;
  {
    std::lock_guard lock(store_mu_);
    if (pending_arrivals_.empty() || now < arrivals_retry_ms_) return;
    arrivals = pending_arrivals_;
  }
  std::map<std::string, int64_t> rows;  // owner -> device rows moved
  auto written = control_write([&]() -> Status {
    std::lock_guard lock(store_mu_);
    rows.clear();
    for (const auto& [owner, from_to] : arrivals) {
      auto n = store_.set_device_cell(owner, from_to.second);
      if (!n) return n.error().with_context("move device=" + owner);
      rows[owner] = *n;
    }
    return {};
  });
  if (!written) {
    {
      std::lock_guard lock(store_mu_);
      arrivals_retry_ms_ = now + kArrivalsRetryMs;
    }
    if (auto n = log_limit_.admit("record arrivals")) {
      log::get("hub")->warn("could not record {} device(s) arrived from draining cells, tried again in {} s: {}{}",
                            arrivals.size(), kArrivalsRetryMs / 1000, written.error().message, suppressed_note(*n));
    }
    return;
  }
  std::lock_guard lock(store_mu_);
  arrivals_retry_ms_ = 0;
  follow_directory();
  std::vector<std::string> owners;
  for (const auto& [owner, from_to] : arrivals) {
    pending_arrivals_.erase(owner);
    owners.push_back(owner);
    if (rows[owner] > 0) {
      note_moved(owner, from_to.first, from_to.second, rows[owner], ", recorded for every hub process");
    } else {
      move_asked_ms_.erase(owner);
    }
  }
  add_arrival_members(owners);
}

// The rows of running campaigns for devices that came into this process's
// cells: the holder of the cell they left made theirs, this store has none
// (it built its cells' members before they came). Each gets the wave the
// campaign's rank gives it, as if it had been in this cell from the start;
// its reports then count here, once (the old holder's row moved out of the
// cell it publishes with the device). Found by device id (members_by_id):
// a batch of arrivals costs its own devices' rows, not a scan of the fleet
// per campaign and cell (docs/adr/0019, "Added after").
void HubService::add_arrival_members(const std::vector<std::string>& owners) {
  std::vector<std::string> arrived;
  for (const auto& owner : owners) {
    auto ids = store_.devices_of_owner(owner);
    if (!ids) {
      log::get("hub")->warn("campaign membership of device={}: {}", owner, ids.error().message);
      continue;
    }
    arrived.insert(arrived.end(), ids->begin(), ids->end());
  }
  auto campaigns = store_.list_campaigns();
  if (!campaigns) {
    log::get("hub")->warn("campaign membership of arrived devices: {}", campaigns.error().message);
    return;
  }
  const int64_t now = clock_.now_unix_ms();
  std::set<std::string> open;
  std::vector<std::pair<std::string, std::vector<CampaignMember>>> joins;  // by campaign
  for (const auto& c : *campaigns) {
    if (!campaign_runs(c.state) && c.state != CampaignState::paused) continue;
    open.insert(c.id);
    auto members = members_by_id(c, arrived);
    if (!members) {
      log::get("hub")->warn("campaign={}: membership of arrived devices: {}", c.id, members.error().message);
      continue;
    }
    if (!members->empty()) joins.emplace_back(c.id, std::move(*members));
  }
  // Cutoffs of campaigns that no longer take members are not needed again.
  std::erase_if(canary_cutoffs_, [&](const auto& kv) { return !open.count(kv.first); });
  // Each row in the store of its device's cell, one transaction per store.
  for (const auto& g : store_groups(std::nullopt)) {
    sql::Transaction tx(g.store->device_db());
    std::map<std::string, int> added;
    for (const auto& [campaign, members] : joins) {
      for (const auto& m : members) {
        if (!g.holds(m.cell)) continue;
        if (auto s = g.store->add_campaign_member(campaign, m, now); !s) {
          log::get("hub")->warn("campaign={} device={}: membership: {}", campaign, m.device_id, s.error().message);
        } else {
          ++added[campaign];
        }
      }
    }
    if (auto s = tx.commit(); !s) {
      log::get("hub")->warn("campaign membership of arrived devices: {}", s.error().message);
      continue;
    }
    for (const auto& [campaign, n] : added) log::get("hub")->info("campaign={}: {} arrived device(s) joined", campaign, n);
  }
}

void HubService::ensure_cell_membership(const CampaignRecord& c) {
  if (!campaign_runs(c.state) && c.state != CampaignState::paused) return;
  std::optional<Selector> sel;
  std::optional<Strategy> strategy;
  for (int cell : owned_cells()) {
    const auto key = std::make_pair(c.id, cell);
    if (members_built_.count(key)) continue;
    DeviceStore& cell_store = device_store(cell);
    auto present = cell_store.campaign_counts(c.id, cell);
    if (!present) continue;
    if (present->empty()) {
      if (!sel) {
        auto parsed = Selector::parse(c.selector);
        if (!parsed) return;
        sel = std::move(*parsed);
        strategy = strategy_of(c);
      }
      auto members = campaign_members(c, *sel, *strategy, cell);
      if (!members) {
        log::get("hub")->warn("campaign={} cell={}: membership: {}", c.id, cell, members.error().message);
        continue;
      }
      // The cell's rows in one transaction of its own store (not the
      // engine's control write: ADR 18); a failure leaves none, and the
      // next tick tries again.
      const int64_t now = clock_.now_unix_ms();
      sql::Transaction tx(cell_store.device_db());
      if (!tx.ok()) continue;
      bool failed = false;
      for (const auto& m : *members) {
        if (auto s = cell_store.add_campaign_member(c.id, m, now); !s) {
          log::get("hub")->warn("campaign={} cell={}: membership: {}", c.id, cell, s.error().message);
          failed = true;
          break;
        }
      }
      if (failed) continue;
      if (auto s = tx.commit(); !s) {
        log::get("hub")->warn("campaign={} cell={}: membership: {}", c.id, cell, s.error().message);
        continue;
      }
      if (!members->empty()) {
        log::get("hub")->info("campaign={} cell={}: {} members from the rank (made on another hub)", c.id, cell,
                              members->size());
      }
    }
    members_built_.insert(key);
  }
}

void HubService::adopt_reported_generation(DeviceRecord& dev, const v1::Report& r, CampaignRows& rows) {
  if (!cfg_.share_cells || r.campaign_id().empty() || r.generation() <= dev.generation) return;
  if (StoreMutex::holding_file_alone()) {
    needs_whole_lock() = true;  // the campaign is hub.db's
    return;
  }
  auto c = store_.get_campaign(r.campaign_id());
  if (!c || !*c) return;
  auto [it, fresh] = rows.try_emplace(r.campaign_id());
  CachedCampaignRow& cached = it->second;
  if (fresh) {
    auto cd = device_store(dev.cell).campaign_device(r.campaign_id(), dev.id);
    if (cd && *cd) cached.row = std::move(**cd);
  }
  // Released by the cell's previous owner (this store never sent it, or
  // sent an older generation while the device was away): the row takes the
  // device's generation, and its report below counts it, once.
  const std::string status = cached.row ? cached.row->status : std::string();
  const bool open = status == "waiting" || status == "pending" || status == "in_progress";
  if (open && r.generation() > cached.row->generation && (*c)->state != CampaignState::rolling_back) {
    cached.row->status = "pending";
    cached.row->generation = r.generation();
    cached.row->released_ms = cached.row->updated_ms = clock_.now_unix_ms();
    cached.dirty = true;
  }
  // Whatever this hub releases next must be newer than what the device saw.
  dev.generation = r.generation();
  dev.campaign_id = r.campaign_id();
  dev.desired_bundle_id = (*c)->bundle_id;
}

HubService::CellFilter HubService::release_filter() const {
  CellFilter f = cell_filter();
  if (!cfg_.share_cells) return f;
  // A cell whose session just began (taken over, or its broker back) waits
  // for the roll call's answers before releasing anyone there: until then
  // this hub does not know which generation its devices are at.
  const int64_t now = clock_.now_unix_ms();
  std::vector<int> ready;
  for (int cell : owned_cells()) {
    if (cells_[static_cast<size_t>(cell)]->settle_until_ms.load() <= now) ready.push_back(cell);
  }
  return ready;
}

Result<std::vector<CellCampaignCounts>> HubService::cell_counts(Store& from, const std::string& campaign_id) {
  const CellFilter own = cell_filter();
  std::vector<int> local;
  const auto stores = stores_for(from);
  if (own) {
    local = *own;
  } else {
    auto present = cells_with_rows(from, campaign_id);
    if (!present) return present.error();
    local = std::move(*present);
  }
  std::vector<CellCampaignCounts> out;
  const int64_t now = clock_.now_unix_ms();
  for (int cell : local) {
    DeviceStore& holder = stores.size() == 1 ? *stores.front() : device_store(cell);
    auto rows = holder.campaign_counts(campaign_id, cell);
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

Result<std::vector<CampaignCountRow>> HubService::campaign_totals(Store& from, const std::string& campaign_id,
                                                                  std::vector<int>* unheard) {
  if (unheard) unheard->clear();
  // Owning every cell, the totals are the stores' own (one query each, as before cells).
  const CellFilter own = cell_filter();
  if (!own) {
    std::vector<std::vector<CampaignCountRow>> parts;
    for (DeviceStore* s : stores_for(from)) {
      auto counts = s->campaign_counts(campaign_id);
      if (!counts) return counts.error();
      parts.push_back(std::move(*counts));
    }
    return parts.size() == 1 ? std::move(parts.front()) : sum_campaign_counts(parts);
  }
  auto cells = cell_counts(from, campaign_id);
  if (!cells) return cells.error();
  if (unheard) {
    auto needed = campaign_member_cells(campaign_id);
    if (!needed) return needed.error();
    for (int cell : *needed) {
      const bool heard = in_cells(own, cell) || std::any_of(cells->begin(), cells->end(), [&](const auto& p) {
                           return p.cell == cell;
                         });
      if (!heard) unheard->push_back(cell);
    }
  }
  return sum_cell_counts(*cells);
}

Result<std::vector<int>> HubService::campaign_member_cells(const std::string& campaign_id) {
  if (!cfg_.share_cells) return cells_with_rows(store_, campaign_id);
  if (auto it = member_cells_.find(campaign_id); it != member_cells_.end()) return it->second;
  auto c = store_.get_campaign(campaign_id);
  if (!c) return c.error();
  if (!*c) return std::vector<int>{};
  auto sel = Selector::parse((*c)->selector);
  if (!sel) return sel.error();
  std::set<int> cells;
  auto listed = store_.each_device_target_cell([&](const std::string&, const std::string& project,
                                                   bool decommissioned, const Labels& labels, int cell) {
    if (project == (*c)->project && !decommissioned && sel->matches(labels)) cells.insert(cell);
  });
  if (!listed) return listed.error();
  std::vector<int> out(cells.begin(), cells.end());
  if (member_cells_.size() > 1024) member_cells_.clear();
  member_cells_[campaign_id] = out;
  return out;
}

void HubService::publish_cell_counts(const std::string& campaign_id) {
  if (!cfg_.coordinator) return;
  const std::vector<int> own = owned_cells();
  std::lock_guard lock(coord_mu_);
  if (!board_) return;
  for (int cell : own) {
    auto rows = device_store(cell).campaign_counts(campaign_id, cell);
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
