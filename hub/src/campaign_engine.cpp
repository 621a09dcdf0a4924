// The campaign engine: releases devices wave by wave within max-in-flight,
// expires per-device deadlines, applies the failure threshold (pause, abort
// or roll back), soaks between waves, and folds device reports into each
// device's campaign row. Everything it knows is in the store, so a hub that
// is killed carries on where it stopped; a row's final outcome is written once.
#include <algorithm>
#include <cmath>
#include <queue>
#include <nlohmann/json.hpp>
#include <set>


#include "flotilla/common/crypto.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/hub/merge.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/hub/timezone.hpp"

namespace flotilla::hub {

bool campaign_status_is_final(const std::string& s) {
  return s == "applied" || s == "failed" || s == "superseded" || s == "skipped" || s == "rolled_back" ||
         s == "rollback_failed";
}

namespace {

// Whether campaign c targets a device of this project and labels, by the
// directory's columns (a decommissioned device is never targeted).
bool targets(const CampaignRecord& c, const Selector& sel, const std::string& project, bool decommissioned,
             const Labels& labels) {
  return project == c.project && !decommissioned && sel.matches(labels);
}

// A device of `cell` as a member of campaign c: its rank by the campaign's
// hash and, for a campaign with a maintenance window, its time zone. The
// caller sets the wave (it depends on the rank and on who asks).
CampaignMember member_of(const CampaignRecord& c, const Strategy& strategy, const std::string& id,
                         const Labels& labels, int cell) {
  return {id, campaign_rank(c.id, id), 0, strategy.window.enabled() ? strategy.window.zone_for(labels) : "", cell};
}

// What a device report means for its campaign row.
std::string outcome_for(v1::AgentState s) {
  switch (s) {
    case v1::AGENT_STATE_APPLIED: return "applied";
    case v1::AGENT_STATE_FAILED:
    case v1::AGENT_STATE_REFUSED:
    case v1::AGENT_STATE_ROLLED_BACK: return "failed";
    default: return "in_progress";
  }
}

std::set<std::string> split_zones(const std::string& text) {
  std::set<std::string> out;
  size_t at = 0;
  while (at < text.size()) {
    size_t end = text.find(',', at);
    if (end == std::string::npos) end = text.size();
    if (end > at) out.insert(text.substr(at, end - at));
    at = end + 1;
  }
  return out;
}

std::string join_zones(const std::set<std::string>& zones) {
  std::string out;
  for (const auto& z : zones) out += (out.empty() ? "" : ",") + z;
  return out;
}

// States in which devices may still join (live membership).
bool accepts_members(CampaignState state) { return campaign_runs(state) || state == CampaignState::paused; }

}  // namespace

Strategy strategy_of(const CampaignRecord& c) {
  auto j = nlohmann::json::parse(c.strategy.empty() ? "{}" : c.strategy, nullptr, false);
  auto s = Strategy::from_json(j.is_discarded() ? nlohmann::json::object() : j);
  return s ? *s : Strategy{};
}

void CampaignCounts::add(const std::string& status, int64_t n) {
  total += n;
  if (status == "waiting") waiting += n;
  else if (status == "pending") pending += n;
  else if (status == "in_progress") in_progress += n;
  else if (status == "applied") applied += n;
  else if (status == "failed") failed += n;
  else if (status == "superseded") superseded += n;
  else if (status == "skipped") skipped += n;
  else if (status == "rolling_back") rolling_back += n;
  else if (status == "rolled_back") rolled_back += n;
  else if (status == "rollback_failed") rollback_failed += n;
}

Result<BundleRecord> HubService::bundle_with_envelope(const std::string& id) {
  if (auto it = bundle_cache_.find(id); it != bundle_cache_.end()) return it->second;
  auto b = store_.get_bundle(id, true);
  if (!b) return b.error();
  if (!*b) return make_error(Errc::not_found, "bundle " + id + " is gone");
  // Signatures can be merged in later uploads: keep the cache small and fresh.
  if (bundle_cache_.size() > 64) bundle_cache_.clear();
  bundle_cache_[id] = **b;
  return **b;
}

std::vector<int64_t> HubService::CampaignPlan::per_wave(int wave_count) const {
  std::vector<int64_t> out(static_cast<size_t>(std::max(wave_count, 0)), 0);
  for (const auto& m : members) {
    if (m.wave >= 0 && m.wave < wave_count) ++out[static_cast<size_t>(m.wave)];
  }
  return out;
}

Result<HubService::CampaignPlan> HubService::plan_campaign(const std::string& name, const std::string& bundle_key,
                                                           const std::string& selector_text, const Strategy& strategy,
                                                           const std::string& project,
                                                           const std::string& campaign_id) {
  auto sel = Selector::parse(selector_text);
  if (!sel) return sel.error();
  std::lock_guard lock(store_mu_);
  CampaignPlan plan;
  CampaignRecord& c = plan.record;
  auto b = store_.get_bundle(bundle_key, false, project);
  if (!b) return b.error();
  if (!*b) return make_error(Errc::not_found, "no bundle '" + bundle_key + "' (use an id or name:version)");
  const BundleRecord& bundle = **b;
  if (bundle.expires_unix != 0 && bundle.expires_unix <= clock_.now_unix()) {
    return make_error(Errc::invalid_argument, "bundle " + bundle.id + " has expired; devices would refuse it");
  }
  c.id = campaign_id.empty() ? "c-" + crypto::random_token(6) : campaign_id;
  c.name = name.empty() ? bundle.name + "-" + std::to_string(bundle.version) : name;
  c.bundle_id = bundle.id;
  c.selector = sel->text();
  c.state = CampaignState::running;
  c.created_ms = c.updated_ms = clock_.now_unix_ms();
  // The bundle's project, also for a caller of every project: a bundle's
  // files go only to devices of the project it was uploaded to.
  c.project = bundle.project;
  c.strategy = strategy.to_json().dump();
  auto rows = campaign_members(c, *sel, strategy, std::nullopt);
  if (!rows) return rows.error();
  if (rows->empty()) {
    return make_error(Errc::invalid_argument, "selector '" + sel->text() + "' matches no enrolled device");
  }
  std::set<std::string> zones;
  for (const auto& r : *rows) {
    if (!r.zone.empty()) zones.insert(r.zone);
  }
  c.zones = join_zones(zones);
  plan.members = std::move(*rows);
  return plan;
}

Status HubService::write_campaign(const CampaignPlan& plan) {
  std::lock_guard lock(store_mu_);
  const CampaignRecord& c = plan.record;
  // The record is control data (hub.db); each member's row goes to the
  // store of its device's cell, the cell the directory gave it (ADR 18).
  // One transaction while every cell's store is hub.db. With a file per
  // cell, each file's rows commit before the record: a crash in between
  // leaves rows of a campaign hub.db does not have, which the files drop at
  // the next open (reconcile_cell_file); the other order would leave a
  // campaign without its rows in a cell, which nothing could tell apart
  // from a cell with no matching device.
  if (cell_files()) {
    std::map<int, std::vector<const CampaignMember*>> by_cell;
    for (const auto& m : plan.members) by_cell[m.cell].push_back(&m);
    for (const auto& [cell, members] : by_cell) {
      DeviceStore& rows = device_store(cell);
      sql::Transaction tx(rows.device_db());
      if (!tx.ok()) {
        return make_error(Errc::unavailable, "cannot begin a transaction in cell " + std::to_string(cell) + "'s file",
                          true);
      }
      for (const CampaignMember* m : members) {
        if (auto s = rows.add_campaign_member(c.id, *m, c.created_ms); !s) return s;
      }
      if (auto s = tx.commit(); !s) return s;
    }
    if (auto s = store_.insert_campaign_record(c); !s) return s;
  } else {
    sql::Transaction tx(store_.db());
    if (!tx.ok()) return make_error(Errc::unavailable, "cannot begin transaction", true);
    if (auto s = store_.insert_campaign_record(c); !s) return s;
    for (const auto& m : plan.members) {
      if (auto s = device_store(m.cell).add_campaign_member(c.id, m, c.created_ms); !s) return s;
    }
    if (auto s = tx.commit(); !s) return s;
  }
  log::get("hub")->info("campaign created id={} bundle={} devices={} waves={}", c.id, c.bundle_id, plan.members.size(),
                        strategy_of(c).wave_count());
  return {};
}

Result<std::vector<CampaignCountRow>> HubService::campaign_counts(const std::string& id) {
  std::lock_guard lock(store_mu_);
  return campaign_totals(store_, id);
}

Result<CampaignRecord> HubService::create_campaign(const std::string& name, const std::string& bundle_key,
                                                   const std::string& selector_text, const Strategy& strategy,
                                                   const std::string& project, const std::string& campaign_id) {
  if (auto sel = Selector::parse(selector_text); !sel) return sel.error();
  CampaignRecord c;
  auto created = control_write([&]() -> Status {
    // One hold of the lock from the plan to its rows: a device enrolled in
    // between would miss both the plan and, the record not yet written,
    // live membership.
    std::lock_guard lock(store_mu_);
    auto plan = plan_campaign(name, bundle_key, selector_text, strategy, project, campaign_id);
    if (!plan) return plan.error();
    if (auto s = write_campaign(*plan); !s) return s;
    c = std::move(plan->record);
    return {};
  });
  if (!created) return created.error();
  engine_cv_.notify_one();
  return c;
}

Result<std::vector<CampaignMember>> HubService::campaign_members(const CampaignRecord& c, const Selector& sel,
                                                                       const Strategy& strategy,
                                                                       std::optional<int> cell) {
  std::vector<CampaignMember> rows;
  std::vector<double> ranks;
  auto listed = store_.each_device_target_cell([&](const std::string& id, const std::string& dev_project,
                                                   bool decommissioned, const Labels& labels, int dev_cell) {
    if (!targets(c, sel, dev_project, decommissioned, labels)) return;
    rows.push_back(member_of(c, strategy, id, labels, dev_cell));
    ranks.push_back(rows.back().rank);
  });
  if (!listed) return listed.error();
  // Waves over every matching device: a count-based canary is the N lowest
  // ranks of them all, whichever cell asks.
  auto waves = assign_waves(strategy, ranks);
  std::vector<CampaignMember> out;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (cell && rows[i].cell != *cell) continue;
    rows[i].wave = waves[i];
    out.push_back(std::move(rows[i]));
  }
  return out;
}

Result<std::vector<CampaignMember>> HubService::members_by_id(const CampaignRecord& c,
                                                                    const std::vector<std::string>& ids) {
  std::lock_guard lock(store_mu_);
  auto sel = Selector::parse(c.selector);
  if (!sel) return sel.error();
  const Strategy strategy = strategy_of(c);
  std::vector<CampaignMember> out;
  for (const auto& id : ids) {
    auto d = store_.directory_entry(id);
    if (!d) return d.error().with_context("device=" + id);
    if (!*d || !targets(c, *sel, (*d)->project, (*d)->decommissioned, (*d)->labels)) continue;
    auto m = member_of(c, strategy, id, (*d)->labels, (*d)->cell);
    m.wave = strategy.wave_for_rank(m.rank);
    if (strategy.canary_count > 0) {
      auto cutoff = canary_cutoff(c, *sel, strategy);
      if (!cutoff) return cutoff.error();
      if (m.rank <= *cutoff) m.wave = 0;
    }
    out.push_back(std::move(m));
  }
  return out;
}

Result<double> HubService::canary_cutoff(const CampaignRecord& c, const Selector& sel, const Strategy& strategy) {
  if (auto it = canary_cutoffs_.find(c.id); it != canary_cutoffs_.end()) return it->second;
  // The N lowest ranks so far, the highest of them on top.
  const auto n = static_cast<size_t>(std::max<int64_t>(strategy.canary_count, 1));
  std::priority_queue<double> lowest;
  auto listed = store_.each_device_target(
      [&](const std::string& id, const std::string& project, bool decommissioned, const Labels& labels) {
        if (!targets(c, sel, project, decommissioned, labels)) return;
        const double rank = campaign_rank(c.id, id);
        if (lowest.size() < n) {
          lowest.push(rank);
        } else if (rank < lowest.top()) {
          lowest.pop();
          lowest.push(rank);
        }
      });
  if (!listed) return listed.error().with_context("canary of campaign=" + c.id);
  std::vector<double> ranks;
  for (; !lowest.empty(); lowest.pop()) ranks.push_back(lowest.top());
  const double cutoff = canary_cut({ranks}, strategy.canary_count);
  canary_cutoffs_[c.id] = cutoff;
  return cutoff;
}

void HubService::engine_loop() {
  while (!stopping_) {
    if (!retick_.exchange(false)) {
      std::unique_lock lock(engine_mu_);
      engine_cv_.wait_for(lock, std::chrono::milliseconds(250));
    }
    if (stopping_) break;
    tick();
  }
}

void HubService::tick() {
  // With an engine thread the keeper thread renews the leases and ownership
  // (every ttl/6); a tick doing it again only doubled the round trips to
  // etcd. A hub ticked by hand (tests, no threads) coordinates here.
  if (!(cfg_.engine_thread && cfg_.coordinator)) coordinate();
  // The leader's decisions hold only while it still leads: its tick's entry
  // is checked against the leader key in the same transaction, so a leader
  // deposed meanwhile (its lease ran out, another hub leads) writes nothing.
  std::vector<coord::Compare> guard;
  {
    std::lock_guard lock(coord_mu_);
    if (leader_ && leadership_) guard = leadership_->guard();
  }
  // Hubs sharing cells make the rows of the cells they own (from the
  // replicated directory and the campaign's rank) before deciding: cell
  // data, committed in each cell's store, never inside the control write.
  if (control_log_ && cfg_.share_cells) {
    std::lock_guard lock(store_mu_);
    if (auto campaigns = store_.list_campaigns(); campaigns) {
      for (const auto& c : *campaigns) ensure_cell_membership(c);
    }
  }
  // First the decisions, one control write: wave state, thresholds, the
  // rate's tokens and the engine's audit rows are control data (with the
  // control log, one entry per tick that changed them). Then, once they
  // committed, what they imply for the devices of this hub's cells, in
  // each cell's store (ADR 18: hub.db first, the cells' rows derived).
  std::vector<CellWork> work;
  auto decided = control_write([&]() -> Status {
    std::lock_guard lock(store_mu_);
    work.clear();
    auto campaigns = store_.list_campaigns();
    if (!campaigns) return campaigns.error().with_context("list campaigns");
    sql::Transaction tx(store_.db());
    for (auto& c : *campaigns) {
      if (c.state == CampaignState::aborted) {
        // Its cells skip their waiting rows, whichever hub aborted it.
        work.push_back(CellWork{c});
        continue;
      }
      if (!campaign_runs(c.state) && c.state != CampaignState::rolling_back) continue;
      if (control_log_) {
        // Several hubs: membership rows stay with the hub whose devices they
        // are (docs/adr/0016); a hub with none of a campaign's devices must
        // not judge it (it would find it complete).
        auto held = holds_rows(c.id);
        if (!held) continue;
        // The leader of hubs sharing cells decides on the published counts
        // even when it owns none of the cells.
        if (!*held && !(cfg_.share_cells && leader_)) continue;
      }
      work.push_back(decide_campaign(c));
    }
    return tx.commit();
  }, guard);
  if (!decided) {
    // With etcd away every tick that changes wave state is refused: said
    // at a bounded rate, not four times a second.
    if (!control_log_) {
      log::get("hub")->error("engine: {}", decided.error().message);
    } else if (auto dropped = log_limit_.admit("engine-tick")) {
      log::get("hub")->error("engine: {} (similar lines dropped: {})", decided.error().message, *dropped);
    }
    return;  // nothing was decided, so the cells have nothing new to do
  }
  Publishes publishes;
  {
    std::lock_guard lock(store_mu_);
    for (auto& w : work) {
      if (w.rate_spent_applied) rate_spent_.erase(w.campaign.id);
      const int64_t released = carry_out(w, publishes);
      if (released > 0 && strategy_of(w.campaign).rate.enabled()) rate_spent_[w.campaign.id] += released;
      // Once per tick, and only what changed: what the leader sums (an
      // aborted campaign's once more, after its cells skipped their rows).
      if (w.campaign.state != CampaignState::aborted || w.followed) publish_cell_counts(w.campaign.id);
    }
  }
  // Published only after the commit; a crash in between is repaired by
  // republish_pending() at the next connect.
  publish_all(publishes, "desired");
  continue_drains();
}

Status HubService::set_released_desired(int cell, const std::string& device_id, uint64_t generation,
                                        const std::string& bundle_id, const std::string& campaign_id) {
  ControlLog::LocalWrites local;
  return device_store(cell).set_device_desired(device_id, generation, bundle_id, campaign_id);
}

// The decisions on one campaign, inside the tick's control write: a
// rollback finished, the failure threshold, a wave done (then the next one
// or completion), and how many devices its cells may release now. Totals
// decide on the leader alone (docs/architecture.md, "Campaigns across
// cells"); every hub computes its own cells' release budget.
HubService::CellWork HubService::decide_campaign(CampaignRecord& c) {
  auto logger = log::get("hub");
  const Strategy strategy = strategy_of(c);
  const int64_t now = clock_.now_unix_ms();
  const bool leader = leader_;
  CellWork w;
  auto decided = [&] {
    w.campaign = c;
    return w;
  };
  auto update = [&] { save_decision(c, now); };

  if (c.state == CampaignState::rolling_back) {
    // Every hub's cells send their devices back (carry_out); the leader
    // says when they are all back.
    if (!leader) return decided();
    std::vector<int> unheard;
    auto counts = campaign_totals(store_, c.id, &unheard);
    if (!counts || !unheard.empty()) return decided();  // a cell not heard from may still be rolling back
    for (const auto& row : *counts) {
      if (row.status == "rolling_back" && row.online) return decided();  // still on its way back
    }
    c.state = CampaignState::rolled_back;
    update();
    logger->info("campaign rolled back id={}", c.id);
    return decided();
  }

  // Decisions on the totals wait until every cell with members of the
  // campaign is counted: one never heard from (its owner has not published
  // yet, or this hub lost its lease and with it its own cells) would make
  // its devices look absent and the campaign complete.
  std::vector<int> unheard;
  auto counts = campaign_totals(store_, c.id, &unheard);
  if (!counts) return decided();
  const bool decide = leader && unheard.empty();
  if (leader && !unheard.empty()) {
    if (auto dropped = log_limit_.admit("unheard cells")) {
      logger->warn("campaign={}: no counts from cell {} yet (of {} unheard); not judging waves or thresholds "
                   "(similar lines dropped: {})",
                   c.id, unheard.front(), unheard.size(), *dropped);
    }
  }
  CampaignCounts all;
  int64_t in_flight = 0;
  for (const auto& row : *counts) {
    all.add(row.status, row.count);
    if (row.online && (row.status == "pending" || row.status == "in_progress")) in_flight += row.count;
  }

  // The failure threshold judges outcomes since the last resume.
  const int64_t finals = all.applied + all.failed - c.baseline_finals;
  const int64_t failed = all.failed - c.baseline_failed;
  const auto& th = strategy.threshold;
  if (decide && finals >= th.min_sample && finals > 0 &&
      failed * 100.0 >= th.percent * static_cast<double>(finals)) {
    const std::string why = "failure threshold reached: " + std::to_string(failed) + " of " + std::to_string(finals) +
                            " outcomes failed (threshold " + std::to_string(static_cast<int>(th.percent)) + "%)";
    logger->warn("campaign={} {}; action={}", c.id, why, th.action);
    c.state_reason = why;
    nlohmann::json detail{{"trigger", "failure_threshold"},
                          {"failed", failed},
                          {"outcomes", finals},
                          {"threshold_percent", th.percent},
                          {"min_sample", th.min_sample},
                          {"wave", strategy.wave_name(c.current_wave)}};
    // One part per device store (ADR 18).
    std::vector<std::map<std::string, int64_t>> reasons;
    for (DeviceStore* s : stores_for(store_)) {
      if (auto r = s->failure_reasons(c.id); r) reasons.push_back(std::move(*r));
    }
    detail["failure_reasons"] = sum_reason_counts(reasons);
    audit_engine_action(c, th.action, detail);
    if (th.action == "rollback") {
      start_rollback(c, why);
      return decided();
    }
    // Aborted: the cells skip their waiting rows.
    c.state = th.action == "abort" ? CampaignState::aborted : CampaignState::paused;
    update();
    return decided();
  }

  if (decide) judge_waves(c, strategy, *counts, all, now);
  if (!campaign_runs(c.state)) return decided();

  // Release the current wave (and any earlier one's stragglers): online
  // devices within max_in_flight, offline ones regardless (their desired
  // state waits for them, retained, and they take no slot). At most
  // kReleaseChunk per tick, online first: the transaction that holds the
  // store stays short, devices get their desired state while the rest is
  // still being released, and the engine ticks again at once.
  int64_t budget = strategy.max_in_flight > 0 ? std::max<int64_t>(0, strategy.max_in_flight - in_flight)
                                              : kReleaseChunk;
  int64_t total_cap = kReleaseChunk;
  if (strategy.rate.enabled()) {
    // A token bucket over the engine's clock, about one second deep:
    // releases follow the rate smoothly instead of in a burst each minute.
    // One token of headroom so a slow rate (60/min: a token per second)
    // loses no fraction to the cap between ticks.
    const double per_minute = strategy.rate.per_minute(all.applied);
    const double depth = std::max(1.0, per_minute / 60.0) + 1.0;
    if (c.rate_ms == 0) {
      c.rate_tokens = 1;  // the first device goes at once
    } else {
      // The cells release after this write commits: what they released
      // since the last decision is spent here, before the refill.
      double left = c.rate_tokens;
      if (auto it = rate_spent_.find(c.id); it != rate_spent_.end()) {
        left = std::max(0.0, left - static_cast<double>(it->second));
      }
      c.rate_tokens = std::min(depth, left + static_cast<double>(now - c.rate_ms) * per_minute / 60000.0);
    }
    w.rate_spent_applied = true;
    c.rate_ms = now;
    total_cap = std::min<int64_t>(total_cap, static_cast<int64_t>(std::floor(c.rate_tokens)));
    budget = std::min(budget, total_cap);
    update();
  }
  w.release = true;
  w.online_budget = budget;
  w.total_cap = total_cap;
  return decided();
}

void HubService::save_decision(CampaignRecord& c, int64_t now) {
  c.updated_ms = now;
  if (auto s = store_.update_campaign(c); !s) {
    log::get("hub")->error("engine: update campaign {}: {}", c.id, s.error().message);
  }
}

// A wave is done when every online device in it (and before it) has an
// outcome; offline devices never hold it up. Then the next wave starts
// (after its soak, and its approval where one is required), or, after the
// last, the campaign converges or completes. The leader's, on the totals.
void HubService::judge_waves(CampaignRecord& c, const Strategy& strategy, const std::vector<CampaignCountRow>& counts,
                             const CampaignCounts& all, int64_t now) {
  auto logger = log::get("hub");
  auto update = [&] { save_decision(c, now); };
  // While the hub waits for devices to re-announce (after a broker restart),
  // "offline" means "not heard yet": judging a wave on that would pass a
  // wave whose devices are still applying.
  if (now < presence_settle_until_ms_) return;
  for (const auto& row : counts) {
    if (row.wave > c.current_wave || !row.online) continue;
    if (row.status == "waiting" || row.status == "pending" || row.status == "in_progress") return;
  }
  if (c.wave_done_ms == 0) {
    c.wave_done_ms = now;
    update();
  }
  if (now - c.wave_done_ms < strategy.soak.count()) return;
  if (c.current_wave + 1 < strategy.wave_count()) {
    const int next = c.current_wave + 1;
    if (strategy.needs_approval(next) && c.approved_wave < next) {
      if (c.state != CampaignState::waiting_approval) {
        c.state = CampaignState::waiting_approval;
        c.state_reason = strategy.wave_name(next) + " waits for approval (flotilla campaign approve " + c.id + ")";
        logger->info("campaign={} {}", c.id, c.state_reason);
        update();
      }
      return;
    }
    c.current_wave = next;
    c.wave_done_ms = 0;
    logger->info("campaign={} starts {}", c.id, strategy.wave_name(c.current_wave));
    update();
    return;
  }
  // Every wave is out and every online device answered. Devices that are
  // away keep it converging; it completes when the last of them reports.
  const int64_t away = all.waiting + all.pending + all.in_progress;
  const CampaignState next = away > 0 ? CampaignState::converging : CampaignState::completed;
  if (next == c.state) return;
  c.state = next;
  if (next == CampaignState::completed) {
    logger->info("campaign completed id={} applied={} failed={}", c.id, all.applied, all.failed);
  } else {
    logger->info("campaign converging id={} applied={} failed={} away={}", c.id, all.applied, all.failed, away);
  }
  update();
}

std::vector<HubService::CellGroup> HubService::store_groups(const CellFilter& cells) {
  std::vector<CellGroup> groups;
  std::vector<int> all;
  if (!cells) {
    for (int i = 0; i < cell_count(); ++i) all.push_back(i);
  }
  for (int cell : cells ? *cells : all) {
    DeviceStore& s = device_store(cell);
    auto g = std::find_if(groups.begin(), groups.end(),
                          [&](const CellGroup& x) { return &x.store->device_db() == &s.device_db(); });
    if (g == groups.end()) {
      groups.push_back(CellGroup{&s, {}, std::vector<int>{}});
      g = std::prev(groups.end());
    }
    g->cells.push_back(cell);
    g->filter->push_back(cell);
  }
  // One store holding every cell needs no filter in its queries.
  if (!cells && groups.size() == 1) groups.front().filter.reset();
  return groups;
}

// What a release needs across the cells of one campaign's tick: the signed
// shared part of its desired state, the previous bundles resolved, and
// (clustered devices) which k3s clusters have a node on its way.
struct HubService::ReleaseScratch {
  SharedDesiredPtr shared;
  std::map<std::string, SharedDesiredPtr> shared_cache;
  std::map<std::string, std::string> prev_ids;  // "name:version" -> bundle id
  // Multi-node k3s clusters upgrade in k3s's own order (system-upgrade-
  // controller's): one node at a time, servers first, then agents. Built on
  // the first clustered device from the campaign's unfinished rows: per
  // cluster, whether a node is released and without an outcome (down, or
  // about to be), and how many servers still wait.
  struct ClusterState {
    bool busy = false;
    int servers_waiting = 0;
  };
  std::optional<std::map<std::string, ClusterState>> clusters;
};

// The cells' part of a tick (ADR 18): what the committed campaign record
// implies for the devices of this hub's cells, one transaction per store.
// Running: deadlines expire and the devices picked within the decision's
// budget are released, in (wave, rank) order across the cells. Aborted:
// waiting rows are skipped. Rolling back: devices go back to what they ran.
// Derived and idempotent: run again after a crash, or twice, it finds the
// rows it already moved (no longer waiting, no longer applied) and does
// nothing more. store_mu_ held. Returns how many devices it released.
int64_t HubService::carry_out(CellWork& w, Publishes& publishes) {
  const CampaignRecord& c = w.campaign;
  const bool runs = campaign_runs(c.state);
  const bool follows = c.state == CampaignState::aborted || c.state == CampaignState::rolling_back;
  if (!runs && !follows) return 0;
  auto logger = log::get("hub");
  const Strategy strategy = runs ? strategy_of(c) : Strategy{};
  const int64_t now = clock_.now_unix_ms();
  std::vector<CampaignDeviceRecord> ready;
  if (runs && w.release) {
    auto picked = pick_releasable(c, strategy, w.online_budget, w.total_cap, now);
    if (!picked) {
      logger->error("campaign={} cannot release: {}", c.id, picked.error().message);
    } else {
      ready = std::move(*picked);
    }
    if (static_cast<int64_t>(ready.size()) >= kReleaseChunk) retick_ = true;
  }
  ReleaseScratch scratch;
  int64_t released = 0;
  int64_t sent_back = 0;
  for (const auto& g : store_groups(cell_filter())) {
    // An abort or rollback done in a cell stays done: once per process
    // and cell (again after a restart, when it finds nothing left to do).
    const bool followed = std::all_of(g.cells.begin(), g.cells.end(),
                                      [&](int cell) { return followed_.count({c.id, cell}) > 0; });
    if (follows && followed) continue;
    const size_t published_before = publishes.size();
    int64_t group_released = 0;
    int64_t group_sent = 0;
    sql::Transaction tx(g.store->device_db());
    if (runs) {
      if (auto expired = g.store->expire_deadlines(c.id, now, g.filter); expired && *expired > 0) {
        logger->warn("campaign={} devices_past_deadline={}", c.id, *expired);
      }
      group_released = release_rows(c, strategy, g, ready, scratch, publishes, now);
    } else if (c.state == CampaignState::aborted) {
      skip_waiting(c, g, now);
    } else {
      group_sent = roll_back_cells(c, g, publishes);
    }
    if (auto s = tx.commit(); !s) {
      // Nothing of this store's part happened: the next tick does it again.
      logger->error("campaign={} cells' writes: {}", c.id, s.error().message);
      publishes.resize(published_before);
      continue;
    }
    released += group_released;
    sent_back += group_sent;
    if (follows) {
      for (int cell : g.cells) followed_.insert({c.id, cell});
      w.followed = true;
    }
  }
  if (released > 0) logger->info("campaign={} wave={} released={}", c.id, strategy.wave_name(c.current_wave), released);
  if (sent_back > 0) logger->warn("campaign={} rolling back devices={}: {}", c.id, sent_back, c.state_reason);
  return released;
}

Result<std::vector<CampaignDeviceRecord>> HubService::pick_releasable(const CampaignRecord& c, const Strategy& s,
                                                                      int64_t online_budget, int64_t total_cap,
                                                                      int64_t now_ms) {
  std::vector<CampaignDeviceRecord> ready;
  if (int64_t n = std::min(online_budget, kReleaseChunk); n > 0) {
    auto online = releasable_now(c, s, true, n, now_ms);
    if (!online) return online.error();
    ready = std::move(*online);
  }
  // Offline devices get their desired state retained for when they return,
  // unless a maintenance window decides when they may apply: then they wait
  // for a release while they are online and inside it.
  if (int64_t n = total_cap - static_cast<int64_t>(ready.size()); n > 0 && !s.window.enabled()) {
    auto offline = releasable_now(c, s, false, n, now_ms);
    if (!offline) return offline.error();
    for (auto& r : *offline) ready.push_back(std::move(r));
  }
  return ready;
}

int64_t HubService::release_rows(const CampaignRecord& c, const Strategy& strategy, const CellGroup& g,
                                 std::vector<CampaignDeviceRecord>& ready, ReleaseScratch& scratch,
                                 Publishes& publishes, int64_t now) {
  auto logger = log::get("hub");
  auto load_clusters = [&]() -> bool {
    scratch.clusters.emplace();
    // A cluster's nodes may be in several cells: every cell's rows count.
    for (const auto& any : store_groups(std::nullopt)) {
      auto open = any.store->campaign_devices_with_status(c.id, {"waiting", "pending", "in_progress"});
      if (!open) return false;
      for (const auto& r : *open) {
        if (!any.holds(r.cell)) continue;
        auto od = any.store->get_device(r.device_id);
        if (!od || !*od || (*od)->inventory.cluster_id.empty()) continue;
        auto& cs = (*scratch.clusters)[(*od)->inventory.cluster_id];
        if (r.status != "waiting") cs.busy = true;
        else if ((*od)->inventory.k3s_role != "agent") ++cs.servers_waiting;
      }
    }
    return true;
  };
  int64_t released = 0;
  for (auto& row : ready) {
    if (!g.holds(row.cell)) continue;
    if (!scratch.shared) {
      auto b = desired_shared(c.bundle_id, scratch.shared_cache);
      if (!b) {
        logger->error("campaign={} cannot release: {}", c.id, b.error().message);
        return released;
      }
      scratch.shared = *b;
    }
    DeviceStore& cell_store = *g.store;
    auto dev = cell_store.get_device(row.device_id);
    if (!dev || !*dev) {
      row.status = "skipped";
      row.reason = "device_gone";
      row.updated_ms = now;
      (void)cell_store.save_campaign_device(row);
      continue;
    }
    DeviceRecord d = **dev;
    if (!d.inventory.cluster_id.empty()) {
      if (!scratch.clusters && !load_clusters()) return released;
      auto& cs = (*scratch.clusters)[d.inventory.cluster_id];
      const bool server = d.inventory.k3s_role != "agent";
      // Stays waiting: a later tick releases it once its cluster is free.
      if (cs.busy || (!server && cs.servers_waiting > 0)) continue;
      cs.busy = true;
      if (server) --cs.servers_waiting;
    }
    // What it runs now is what a rollback returns it to.
    if (!d.applied_bundle.empty()) {
      const std::string key = d.applied_bundle + ":" + std::to_string(d.applied_version);
      auto it = scratch.prev_ids.find(key);
      if (it == scratch.prev_ids.end()) {
        // What the device reports is only a name and a version: resolved in
        // the campaign's own project, never to another team's bundle.
        auto prev = store_.get_bundle(key, false, c.project);
        it = scratch.prev_ids.emplace(key, prev && *prev ? (*prev)->id : std::string()).first;
      }
      row.prev_bundle_id = it->second;
    }
    if (auto others = cell_store.supersede_others(d.id, c.id, now); others && !others->empty()) {
      logger->info("device={} leaves campaigns {} for {}", d.id, others->front(), c.id);
    }
    const uint64_t gen = d.generation + 1;
    row.status = "pending";
    row.generation = gen;
    row.released_ms = now;
    row.updated_ms = now;
    if (auto s = cell_store.save_campaign_device(row); !s) return released;
    // The deadline runs from delivery: now if the device is online,
    // otherwise from when it comes back (and pauses while it is away).
    if (auto s = cell_store.start_deadline(c.id, d.id, strategy.device_deadline.count(), now); !s) return released;
    if (auto s = set_released_desired(d.cell, d.id, gen, c.bundle_id, c.id); !s) return released;
    publishes.push_back({d.id, d.gateway, c.id, gen, false, scratch.shared, d.labels,
                         strategy.k3s_action == "rotate_certificates", d.cell, ""});
    ++released;
  }
  return released;
}

Result<std::vector<CampaignDeviceRecord>> HubService::releasable_now(const CampaignRecord& c, const Strategy& s,
                                                                     bool online, int64_t n, int64_t now_ms) {
  // Without a maintenance window, every zone at once ("" = no zone filter).
  std::vector<std::string> zones = {""};
  if (s.window.enabled()) {
    // One query per time zone whose window is open.
    zones.clear();
    for (const auto& zone : split_zones(c.zones)) {
      auto minute = local_minute_of_day(zone, now_ms / 1000);
      if (!minute) {
        log::get("hub")->warn("campaign={} zone={}: {}", c.id, zone, minute.error().message);
        continue;
      }
      if (s.window.open_at(*minute)) zones.push_back(zone);
    }
  }
  // Each store's queries, merged in (wave, rank) order (ADR 18).
  std::vector<std::vector<CampaignDeviceRecord>> parts;
  for (const auto& g : store_groups(release_filter())) {
    for (const auto& zone : zones) {
      auto rows = g.store->releasable(c.id, c.current_wave, online, n, zone, g.filter);
      if (!rows) return rows.error();
      parts.push_back(std::move(*rows));
    }
  }
  return merge_releasable(std::move(parts), n);
}

void HubService::note_member_zones(const std::vector<DeviceRecord>& devices) {
  if (devices.empty()) return;
  for (auto& lc : live_campaigns()) {
    if (!lc.strategy.window.enabled()) continue;
    CampaignRecord& c = lc.c;
    auto zones = split_zones(c.zones);
    const size_t zones_before = zones.size();
    for (const auto& d : devices) {
      if ((c.project != "*" && d.project != c.project) || !lc.selector.matches(d.labels)) continue;
      auto zone = lc.strategy.window.zone_for(d.labels);
      if (!zone.empty()) zones.insert(std::move(zone));
    }
    if (zones.size() != zones_before) {
      c.zones = join_zones(zones);
      (void)store_.update_campaign(c);
    }
  }
}

std::vector<HubService::LiveCampaign> HubService::live_campaigns() {
  std::vector<LiveCampaign> out;
  auto campaigns = store_.list_campaigns();
  if (!campaigns) return out;
  for (auto& c : *campaigns) {
    if (!accepts_members(c.state)) continue;
    Strategy strategy = strategy_of(c);
    if (strategy.membership != Membership::live) continue;
    auto sel = Selector::parse(c.selector);
    if (!sel) continue;
    out.push_back(LiveCampaign{std::move(c), std::move(strategy), std::move(*sel), false, {}});
  }
  return out;
}

void HubService::follow_membership(const DirectoryChange& change, std::vector<LiveCampaign>& live) {
  if (live.empty()) return;
  auto entry = store_.directory_entry(change.device_id);
  if (!entry || !*entry || (*entry)->decommissioned) return;
  const DeviceDirectoryEntry& d = **entry;
  const int64_t now = clock_.now_unix_ms();
  bool joined_any = false;
  for (auto& lc : live) {
    const CampaignRecord& c = lc.c;
    if (c.project != "*" && d.project != c.project) continue;
    // Whose rows: a hub sharing cells keeps those of the cells it owns, and
    // leaves a cell whose rows it has not built yet to ensure_cell_membership
    // (which builds them from the directory, this device included). A hub
    // not sharing cells but sharing the control log keeps the rows of
    // campaigns it holds rows of (ADR 16), and those of its own writes.
    if (cfg_.share_cells) {
      if (!in_cells(cell_filter(), d.cell)) continue;
      if (!members_built_.count({c.id, d.cell})) {
        auto it = lc.cell_has_rows.find(d.cell);
        if (it == lc.cell_has_rows.end()) {
          auto present = device_store(d.cell).campaign_counts(c.id, d.cell);
          it = lc.cell_has_rows.emplace(d.cell, present && !present->empty()).first;
        }
        if (!it->second) continue;
      }
    } else if (control_log_ && !lc.rows_here && !change.local) {
      continue;
    }
    DeviceStore& cell_store = device_store(d.cell);
    auto row = cell_store.campaign_device(c.id, d.id);
    if (!row) continue;
    const bool matches = lc.selector.matches(d.labels);
    if (matches && !*row) {
      // Joins where its hash puts it, but never in a wave already done. Its
      // time zone was added to the campaign's by the write (note_member_zones).
      auto m = member_of(c, lc.strategy, d.id, d.labels, d.cell);
      m.wave = std::max(lc.strategy.wave_for_rank(m.rank), c.current_wave);
      if (cell_store.add_campaign_member(c.id, m, now)) {
        joined_any = true;
        lc.rows_here = true;
        log::get("hub")->info("device={} joins campaign={} wave={}", d.id, c.id, lc.strategy.wave_name(m.wave));
      }
    } else if (matches && (*row)->status == "skipped" && (*row)->reason == "left_selector") {
      CampaignDeviceRecord r = **row;
      r.status = "waiting";
      r.reason.clear();
      r.updated_ms = now;
      (void)cell_store.save_campaign_device(r);
      joined_any = true;
      log::get("hub")->info("device={} rejoins campaign={}", d.id, c.id);
    } else if (!matches && *row && (*row)->status == "waiting") {
      // Not released yet: it leaves. Released rows stay; their desired
      // state is on its way and their outcome counts.
      CampaignDeviceRecord r = **row;
      r.status = "skipped";
      r.reason = "left_selector";
      r.message = "no longer matches the campaign's selector";
      r.updated_ms = now;
      (void)cell_store.save_campaign_device(r);
      log::get("hub")->info("device={} leaves campaign={}: no longer matches", d.id, c.id);
    }
  }
  if (joined_any) engine_cv_.notify_one();
}

void HubService::audit_engine_action(const CampaignRecord& c, const std::string& action, const nlohmann::json& detail) {
  AuditRecord a;
  a.time_ms = clock_.now_unix_ms();
  a.actor = "hub";
  a.actor_name = "campaign-engine";
  a.role = "system";
  a.project = c.project;
  a.method = "AUTO";
  a.path = "/v1/campaigns/" + c.id + "/" + action;
  a.status = 200;
  a.detail = detail.dump();
  if (auto id = store_.append_audit(a); !id) {
    log::get("hub")->error("campaign={} audit of automatic {} failed: {}", c.id, action, id.error().message);
  }
}

void HubService::start_rollback(CampaignRecord& c, const std::string& reason) {
  c.state = CampaignState::rolling_back;
  c.state_reason = reason;
  c.updated_ms = clock_.now_unix_ms();
  (void)store_.update_campaign(c);
  log::get("hub")->warn("campaign={} rolling back: {}", c.id, reason);
}

void HubService::skip_waiting(const CampaignRecord& c, const CellGroup& g, int64_t now) {
  auto waiting = g.store->campaign_devices_with_status(c.id, {"waiting"});
  if (!waiting) return;
  for (auto row : *waiting) {
    if (!g.holds(row.cell)) continue;
    row.status = "skipped";
    row.updated_ms = now;
    (void)g.store->save_campaign_device(row);
  }
}

int64_t HubService::roll_back_cells(const CampaignRecord& c, const CellGroup& g, Publishes& publishes) {
  const int64_t now = clock_.now_unix_ms();
  skip_waiting(c, g, now);
  // Devices that took the bundle (or may be taking it) go back to what they ran
  // before. Devices that failed already restored their previous state themselves.
  static const std::string kNoPrevious = "no previous bundle to return to";
  auto rows = g.store->campaign_devices_with_status(c.id, {"applied", "pending", "in_progress"});
  std::map<std::string, SharedDesiredPtr> shared_cache;
  int64_t sent = 0;
  if (!rows) return 0;
  for (auto row : *rows) {
    if (!g.holds(row.cell)) continue;
    // Found before to have no way back: it stays as it is.
    if (row.message == kNoPrevious) continue;
    if (row.prev_bundle_id.empty()) {
      row.message = kNoPrevious;
      (void)g.store->save_campaign_device(row);
      continue;
    }
    auto prev = desired_shared(row.prev_bundle_id, shared_cache);
    auto dev = g.store->get_device(row.device_id);
    if (!prev || !dev || !*dev) continue;
    DeviceRecord d = **dev;
    const uint64_t gen = d.generation + 1;
    row.status = "rolling_back";
    row.rollback_generation = gen;
    row.updated_ms = now;
    (void)g.store->save_campaign_device(row);
    (void)set_released_desired(d.cell, d.id, gen, row.prev_bundle_id, c.id);
    publishes.push_back({d.id, d.gateway, c.id, gen, true, *prev, d.labels, false, d.cell, ""});
    ++sent;
  }
  return sent;
}

void HubService::on_campaign_report(const DeviceRecord& dev, const v1::Report& r, CampaignRows& rows) {
  auto [it, fresh] = rows.try_emplace(r.campaign_id());
  CachedCampaignRow& cached = it->second;
  if (fresh) {
    auto cd = device_store(dev.cell).campaign_device(r.campaign_id(), dev.id);
    if (cd && *cd) cached.row = std::move(**cd);
  }
  if (!cached.row) return;
  CampaignDeviceRecord& row = *cached.row;
  std::string status;
  if (row.status == "rolling_back" && r.generation() == row.rollback_generation) {
    const std::string o = outcome_for(r.state());
    if (o == "in_progress") return;
    status = o == "applied" ? "rolled_back" : "rollback_failed";
  } else if ((row.status == "pending" || row.status == "in_progress") && r.generation() == row.generation) {
    status = outcome_for(r.state());
    if (r.state() == v1::AGENT_STATE_IDLE && finished_without_outcome(row, r)) {
      cached.dirty = true;
      return;
    }
  } else {
    // Old generations, and anything after a final outcome, are not counted:
    // each device's outcome counts exactly once.
    return;
  }
  if (status == row.status) return;
  row.status = status;
  row.updated_ms = clock_.now_unix_ms();
  row.reason = r.has_error() && r.error().reason() != v1::REASON_NONE ? reason_name(r.error().reason()) : "";
  row.message = r.has_error() ? r.error().message().substr(0, 1024) : "";
  cached.dirty = true;  // written by the caller once the device's batch is applied
}

// An agent's idle report (on every connect) carries the last generation it
// finished. Equal to a row still waiting for an outcome, it means the
// outcome report was lost on the way: acknowledged to the broker by a hub
// that was killed before storing it, say. What the device runs tells which
// outcome it was. Returns true when it settled the row.
bool HubService::finished_without_outcome(CampaignDeviceRecord& row, const v1::Report& r) {
  if (StoreMutex::holding_file_alone()) {
    needs_whole_lock() = true;  // the campaign and its bundle are hub.db's
    return false;
  }
  auto c = store_.get_campaign(row.campaign_id);
  if (!c || !*c) return false;
  auto b = store_.get_bundle((*c)->bundle_id, false);
  if (!b || !*b) return false;
  const bool runs_it = r.has_applied() && r.applied().name() == (*b)->name && r.applied().version() == (*b)->version;
  row.status = runs_it ? "applied" : "failed";
  row.updated_ms = clock_.now_unix_ms();
  row.reason = runs_it ? "" : "outcome_lost";
  row.message = runs_it ? ""
                        : "the device finished generation " + std::to_string(r.generation()) + " running " +
                              r.applied().name() + " version " + std::to_string(r.applied().version()) +
                              ", not the campaign's bundle; its outcome report did not reach the hub";
  log::get("hub")->info("device={} campaign={} outcome recovered from an idle report: {}", row.device_id,
                        row.campaign_id, row.status);
  return true;
}

// A decommissioned device will never answer: its unfinished rows are
// skipped so no wave waits for it and no count stays open.
void HubService::on_device_decommissioned(const std::string& device_id) {
  {
    std::lock_guard lock(store_mu_);
    auto campaigns = store_.list_campaigns();
    if (!campaigns) return;
    const int64_t now = clock_.now_unix_ms();
    // Its rows are in the store of the cell the directory names.
    auto entry = store_.directory_entry(device_id);
    if (!entry || !*entry) return;
    DeviceStore& rows = device_store((*entry)->cell);
    for (const auto& c : *campaigns) {
      auto row = rows.campaign_device(c.id, device_id);
      if (!row || !*row || campaign_status_is_final((*row)->status)) continue;
      CampaignDeviceRecord r = **row;
      r.status = "skipped";
      r.reason = "decommissioned";
      r.updated_ms = now;
      (void)rows.save_campaign_device(r);
    }
  }
  engine_cv_.notify_one();
}

void HubService::republish_pending(int cell, const std::string& only_device) {
  Publishes work;
  std::map<std::string, SharedDesiredPtr> shared_cache;
  {
    std::lock_guard lock(store_mu_);
    auto campaigns = store_.list_campaigns();
    if (!campaigns) return;
    std::vector<DeviceStore*> stores;
    if (cell >= 0 && cell_files()) {
      stores.push_back(&device_store(cell));
    } else {
      stores = stores_for(store_);
    }
    for (const auto& c : *campaigns) {
      std::vector<CampaignDeviceRecord> rows;
      for (DeviceStore* s : stores) {
        auto part = s->campaign_devices_with_status(c.id, {"pending", "rolling_back"});
        if (part) rows.insert(rows.end(), part->begin(), part->end());
      }
      for (const auto& row : rows) {
        if (!only_device.empty() && row.device_id != only_device) continue;
        const bool rollback = row.status == "rolling_back";
        const uint64_t gen = rollback ? row.rollback_generation : row.generation;
        auto d = device_store(row.cell).get_device(row.device_id);
        if (!d || !*d || (*d)->generation != gen || (*d)->state == "decommissioned") continue;
        // Each cell's session republishes its own devices' desired states.
        if (cell >= 0 && (*d)->cell != cell && cell_count() > 1) continue;
        auto shared = desired_shared(rollback ? (*d)->desired_bundle_id : c.bundle_id, shared_cache);
        if (!shared) continue;
        work.push_back({(*d)->id, (*d)->gateway, c.id, gen, rollback, *shared, (*d)->labels,
                        !rollback && strategy_of(c).k3s_action == "rotate_certificates", (*d)->cell, ""});
      }
    }
  }
  publish_all(work, "desired");
  if (!work.empty()) log::get("hub")->info("republished desired state for {} devices", work.size());
}

Result<CampaignRecord> HubService::campaign_action(const std::string& id, const std::string& action) {
  Publishes publishes;
  CampaignRecord c;
  auto acted = control_write([&]() -> Status {
    std::lock_guard lock(store_mu_);
    auto found = store_.get_campaign(id);
    if (!found) return found.error();
    if (!*found) return make_error(Errc::not_found, "no campaign '" + id + "'");
    c = **found;
    const int64_t now = clock_.now_unix_ms();
    auto conflict = [&](const std::string& why) {
      return make_error(Errc::conflict,
                        "cannot " + action + " campaign " + id + ": it is " + std::string(state_name(c.state)) + why);
    };
    sql::Transaction tx(store_.db());
    if (action == "pause") {
      if (!campaign_runs(c.state)) return conflict("");
      c.state = CampaignState::paused;
      c.state_reason = "paused by an operator";
    } else if (action == "resume") {
      if (c.state != CampaignState::paused) return conflict("");
      // Resuming accepts the failures seen so far; the threshold judges what comes next.
      auto counts = campaign_totals(store_, c.id);
      if (!counts) return counts.error();
      CampaignCounts all;
      for (const auto& row : *counts) all.add(row.status, row.count);
      c.baseline_failed = all.failed;
      c.baseline_finals = all.applied + all.failed;
      c.state = CampaignState::running;
      c.state_reason.clear();
    } else if (action == "approve") {
      if (c.state != CampaignState::waiting_approval) {
        return conflict(c.state == CampaignState::paused ? " (resume it first)" : "; only a wave waiting at an approval gate can be "
                                                                      "approved");
      }
      // The gate opens for the next wave only; a later gate waits again.
      c.approved_wave = c.current_wave + 1;
      c.state = CampaignState::running;
      c.state_reason.clear();
    } else if (action == "abort") {
      if (!campaign_runs(c.state) && c.state != CampaignState::paused) return conflict("");
      c.state = CampaignState::aborted;
      c.state_reason = "aborted by an operator";
    } else if (action == "rollback") {
      if (c.state == CampaignState::rolling_back || c.state == CampaignState::rolled_back) return conflict("");
      start_rollback(c, "rolled back by an operator");
    } else {
      return make_error(Errc::invalid_argument,
                        "unknown action '" + action + "' (pause, resume, abort, rollback, approve)");
    }
    c.updated_ms = now;
    if (auto s = store_.update_campaign(c); !s) return s.error();
    return tx.commit();
  });
  if (!acted) return acted.error();
  if (c.state == CampaignState::aborted || c.state == CampaignState::rolling_back) {
    // The cells skip their waiting rows or send their devices back now,
    // after the decision committed (as the engine's tick does).
    std::lock_guard lock(store_mu_);
    CellWork w;
    w.campaign = c;
    (void)carry_out(w, publishes);
    publish_cell_counts(c.id);
  }
  publish_all(publishes, "desired");
  engine_cv_.notify_one();
  log::get("hub")->info("campaign={} action={} state={}", id, action, state_name(c.state));
  return c;
}

// Status polls (the federation asks every region every 2 s, operators
// watch campaigns) read on a read connection: under store_mu_ they waited
// seconds behind report batches and engine ticks at 250,000 devices.
Result<std::optional<CampaignView>> HubService::campaign_view(const std::string& id, bool with_devices) {
  return read([&](Store& from) { return campaign_view_on(from, id, with_devices); });
}

Result<std::optional<CampaignView>> HubService::campaign_view_on(Store& from, const std::string& id,
                                                                 bool with_devices) {
  auto c = from.get_campaign(id);
  if (!c) return c.error();
  if (!*c) return std::optional<CampaignView>();
  CampaignView v;
  v.campaign = **c;
  v.strategy = strategy_of(v.campaign);
  if (auto b = from.get_bundle(v.campaign.bundle_id, false); b && *b) v.bundle = **b;
  auto counts = campaign_totals(from, id);
  if (!counts) return counts.error();
  auto cells = cell_counts(from, id);
  if (!cells) return cells.error();
  v.cells = std::move(*cells);
  v.waves.resize(static_cast<size_t>(v.strategy.wave_count()));
  for (size_t i = 0; i < v.waves.size(); ++i) {
    v.waves[i].index = static_cast<int>(i);
    v.waves[i].name = v.strategy.wave_name(static_cast<int>(i));
  }
  for (const auto& row : *counts) {
    v.counts.add(row.status, row.count);
    const bool unfinished = !campaign_status_is_final(row.status);
    if (unfinished && !row.online) v.counts.offline += row.count;
    if (row.wave >= 0 && row.wave < static_cast<int>(v.waves.size())) {
      auto& w = v.waves[static_cast<size_t>(row.wave)].counts;
      w.add(row.status, row.count);
      if (unfinished && !row.online) w.offline += row.count;
    }
  }
  // Grouped and limited in SQL: a status poll of a million-device campaign
  // must not load a million rows. Each store holding rows (hub.db, or each
  // cell's file) answers; the answers merge.
  std::vector<std::map<std::string, int64_t>> reasons;
  std::vector<std::vector<std::string>> away;
  std::vector<std::vector<CampaignDeviceRecord>> rows;
  constexpr int64_t kAwayListed = 100;
  for (DeviceStore* part : stores_for(from)) {
    auto r = part->failure_reasons(id);
    if (!r) return r.error();
    reasons.push_back(std::move(*r));
    if (v.counts.offline > 0) {
      auto a = part->away_devices(id, kAwayListed);
      if (!a) return a.error();
      away.push_back(std::move(*a));
    }
    if (with_devices) {
      auto d = part->campaign_devices(id);
      if (!d) return d.error();
      rows.push_back(std::move(*d));
    }
  }
  v.failure_reasons = sum_reason_counts(reasons);
  if (v.counts.offline > 0) v.away = merge_device_ids(away, kAwayListed);
  if (with_devices) v.devices = merge_campaign_rows(std::move(rows));
  return std::optional<CampaignView>(std::move(v));
}

Result<std::vector<CampaignView>> HubService::list_campaigns(const std::string& project) {
  return read([&](Store& from) -> Result<std::vector<CampaignView>> {
    auto records = from.list_campaigns();
    if (!records) return records.error();
    std::vector<CampaignView> out;
    for (const auto& c : *records) {
      if (project != "*" && c.project != project) continue;
      auto v = campaign_view_on(from, c.id, false);
      if (!v) return v.error();
      if (*v) out.push_back(std::move(**v));
    }
    return out;
  });
}

}  // namespace flotilla::hub
