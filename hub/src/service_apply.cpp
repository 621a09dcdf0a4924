// HubService::apply: declarative documents (already parsed by
// parse_documents) checked against the store and applied, with pruning, in
// one transaction. It composes the operations the REST routes use one at a
// time (create_campaign, campaign_action, create_token, upload_bundle): with
// store_mu_ held and a transaction open, theirs become savepoints, so an
// error anywhere leaves nothing behind, and a dry run is the same apply
// rolled back at the end, except that a new campaign is only planned: its
// devices per wave come from the plan, so a dry run writes no device store.
#include <algorithm>
#include <set>

#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/hub/artifacts.hpp"
#include "flotilla/hub/declarative.hpp"
#include "flotilla/hub/merge.hpp"
#include "flotilla/hub/service.hpp"

namespace flotilla::hub {

using nlohmann::json;

namespace {

// Strategy fields a running campaign cannot change: devices were put into
// waves from them when it started.
// Rate, soak, deadline, threshold, membership and approval gates may change
// while a campaign runs; these decide how its devices were laid out.
const std::vector<std::string> kFixedWhileRunning = {"canary", "waves", "maintenance_window"};

Error at(const Document& d, Errc code, const std::string& field, const std::string& why) {
  return make_error(code, d.source + ": " + field + ": " + why);
}

std::string token_kind(Kind k) { return k == Kind::api_token ? "api" : "enroll"; }

json parse_or_null(const std::string& text) {
  json j = json::parse(text.empty() ? "null" : text, nullptr, false);
  return j.is_discarded() ? json() : j;
}

// What an object looks like to someone reading a diff: labels (with the
// apply-set label), spec, and what the hub resolved it to.
json display(const json& desired, const std::string& apply_set) {
  if (desired.is_null()) return desired;
  json d = desired;
  if (!apply_set.empty()) d["labels"][kApplySetLabel] = apply_set;
  if (d.contains("labels") && d["labels"].empty()) d.erase("labels");
  return d;
}

}  // namespace

Result<std::vector<AppliedObject>> HubService::list_applied(const std::string& apply_set, bool all_sets) {
  return read([&](Store& from) { return from.list_applied(apply_set, all_sets); });
}

Result<std::vector<CampaignDeviceRecord>> HubService::campaign_failures(const std::string& campaign_id,
                                                                        int64_t limit) {
  return read([&](Store& from) -> Result<std::vector<CampaignDeviceRecord>> {
    std::vector<std::vector<CampaignDeviceRecord>> parts;
    for (DeviceStore* s : stores_for(from)) {
      auto part = s->campaign_failures(campaign_id, limit);
      if (!part) return part.error();
      parts.push_back(std::move(*part));
    }
    return first_failed_rows(std::move(parts), limit);
  });
}

Result<GitRepoRecord> HubService::put_gitrepo(GitRepoRecord r, bool create_only) {
  return control_write([&]() -> Result<GitRepoRecord> {
    std::lock_guard lock(store_mu_);
    auto existing = store_.get_gitrepo(r.name);
    if (!existing) return existing.error();
    if (*existing) {
      if (create_only) return make_error(Errc::already_exists, "GitRepo '" + r.name + "' exists");
      if ((*existing)->project != r.project) {
        return make_error(Errc::conflict, "the GitRepo name '" + r.name + "' is taken (names are unique on a hub)");
      }
      r.created_ms = (*existing)->created_ms;
    } else {
      r.created_ms = clock_.now_unix_ms();
    }
    r.updated_ms = clock_.now_unix_ms();
    if (auto s = store_.put_gitrepo(r); !s) return s.error();
    auto stored = store_.get_gitrepo(r.name);
    if (!stored) return stored.error();
    if (!*stored) return make_error(Errc::internal, "GitRepo vanished after it was stored");
    return **stored;
  });
}

Result<std::optional<GitRepoRecord>> HubService::get_gitrepo(const std::string& name) {
  return read([&](Store& from) { return from.get_gitrepo(name); });
}

Result<std::vector<GitRepoRecord>> HubService::list_gitrepos() {
  return read([&](Store& from) { return from.list_gitrepos(); });
}

Status HubService::delete_gitrepo(const std::string& name) {
  return control_write([&]() -> Status {
    std::lock_guard lock(store_mu_);
    return store_.delete_gitrepo(name);
  });
}

Status HubService::save_gitrepo_status(const GitRepoRecord& r) {
  return control_write([&]() -> Status {
    std::lock_guard lock(store_mu_);
    return store_.save_gitrepo_status(r);
  });
}

namespace {

// One apply in progress: the request, who asks, and the store it works on.
// Its methods run with store_mu_ held and the apply's transaction open.
struct Applier {
  HubService& hub;
  Store& store;
  const ApplyRequest& req;
  const ApplyScope& scope;
  ArtifactStore* artifacts;
  int64_t now_ms;

  // Devices per wave, by the strategy's wave names, into the outcome.
  static void name_waves(const Document& d, const std::vector<int64_t>& per_wave, ObjectOutcome& out) {
    for (size_t i = 0; i < per_wave.size(); ++i) {
      out.waves.emplace_back(d.strategy.wave_name(static_cast<int>(i)), per_wave[i]);
    }
  }

  // The object row as it stands, refused when another apply set owns it.
  Result<std::optional<AppliedObject>> owned(const Document& d, const std::string& project) {
    auto existing = store.get_applied(kind_name(d.kind), project, d.name);
    if (!existing) return existing.error();
    if (*existing && !(*existing)->apply_set.empty() && (*existing)->apply_set != req.apply_set) {
      return at(d, Errc::conflict, "metadata.name",
                kind_name(d.kind) + " " + project + "/" + d.name + " belongs to apply set '" +
                    (*existing)->apply_set + "'; apply it with --applyset " + (*existing)->apply_set +
                    " (Git sync owns sets named gitrepo-*: change it in its repository)");
    }
    return existing;
  }

  // Fills the parts of an outcome every kind shares, and the row to store.
  void settle(ObjectOutcome& out, AppliedObject& row, const std::optional<AppliedObject>& existing,
              const Document& d, const std::string& project, const json& desired) {
    out.kind = d.kind;
    out.project = project;
    out.name = d.name;
    out.source = d.source;
    const json live = existing ? parse_or_null(existing->desired) : json();
    out.live = existing ? display(live, existing->apply_set) : json();
    out.desired = display(desired, req.apply_set);
    const bool same = existing && live == desired && existing->apply_set == req.apply_set;
    // The generation counts changes of what is declared (the spec and what
    // it resolves to), not of labels or ownership.
    json live_core = live, desired_core = desired;
    if (live_core.is_object()) live_core.erase("labels");
    if (desired_core.is_object()) desired_core.erase("labels");
    row = existing ? *existing : AppliedObject{};
    row.kind = kind_name(d.kind);
    row.project = project;
    row.name = d.name;
    row.apply_set = req.apply_set;
    row.desired = desired.dump();
    row.source = d.source;
    if (!existing) {
      row.created_ms = now_ms;
      row.generation = 1;
    } else if (live_core != desired_core) {
      ++row.generation;
    }
    row.observed_generation = row.generation;
    row.updated_ms = now_ms;
    out.action = !existing ? "created" : same ? "unchanged" : "configured";
    out.generation = row.generation;
    out.observed_generation = row.observed_generation;
  }

  Result<ObjectOutcome> campaign(const Document& d, const std::string& project) {
    auto existing = owned(d, project);
    if (!existing) return existing.error();
    auto b = store.get_bundle(d.bundle, false);
    if (!b) return b.error();
    if (!*b || (*b)->project != project) {
      return at(d, Errc::not_found, "spec.bundle",
                "no bundle '" + d.bundle + "' in project " + project +
                    " (an id or name:version; a BundlePublication in the same apply counts)");
    }
    const BundleRecord bundle = **b;
    const json desired{{"labels", d.labels}, {"spec", d.spec}};
    ObjectOutcome out;
    AppliedObject row;
    settle(out, row, *existing, d, project, desired);

    std::optional<CampaignRecord> current;
    if (*existing) {
      auto c = store.get_campaign((*existing)->target);
      if (!c) return c.error();
      current = *c;
    }
    bool new_run = !current;
    if (current && out.action != "unchanged") {
      const CampaignRecord& c = *current;
      const json old_spec = parse_or_null((*existing)->desired).value("spec", json::object());
      auto old_strategy = Strategy::from_json(parse_or_null(c.strategy));
      const json old_st = old_strategy ? old_strategy->to_json() : json::object();
      const json new_st = d.strategy.to_json();
      std::string fixed_change;  // the first field a running campaign cannot change
      if (bundle.id != c.bundle_id) fixed_change = "spec.bundle";
      else if (d.selector != c.selector) fixed_change = "spec.selector";
      for (const auto& k : kFixedWhileRunning) {
        if (fixed_change.empty() && old_st.value(k, json()) != new_st.value(k, json())) {
          fixed_change = "spec.strategy." + k;
        }
      }
      if (!fixed_change.empty() && campaign_active(c.state)) {
        const std::string why =
            fixed_change == "spec.bundle"     ? "it is what its devices are applying"
            : fixed_change == "spec.selector" ? "its devices were chosen when it started"
            : fixed_change == "spec.strategy.maintenance_window"
                ? "its devices' time zones were read when it started"
                : "its devices were put into waves when it started";
        return at(d, Errc::conflict, fixed_change,
                  "campaign " + d.name + " (" + c.id + ") is " + std::string(state_name(c.state)) + " and cannot change this: " + why +
                      ". Abort it (flotilla campaign abort " + c.id +
                      ") to declare a new run, or declare a campaign with a new name");
      }
      if (!fixed_change.empty()) {
        // A finished campaign is history; what it now declares is a new run.
        new_run = true;
        out.detail = "new run (" + c.id + " was " + std::string(state_name(c.state)) + ")";
      } else {
        if (old_st != new_st) {
          if (auto s = store.update_campaign_strategy(c.id, new_st.dump()); !s) return s.error();
        }
        // paused acts when it changes, not on every apply: a campaign the
        // failure threshold paused is not resumed by re-applying the same file.
        const bool was_paused = old_spec.value("paused", false) == true;
        if (was_paused != d.paused) {
          const bool can = d.paused ? campaign_runs(c.state) : c.state == CampaignState::paused;
          if (can) {
            auto r = hub.campaign_action(c.id, d.paused ? "pause" : "resume");
            if (!r) return r.error().with_context(d.source + ": spec.paused");
            out.detail = d.paused ? "paused" : "resumed";
          } else {
            out.detail = std::string("spec.paused is ") + (d.paused ? "true" : "false") + "; the campaign is " +
                         std::string(state_name(c.state)) + ", so nothing to " + (d.paused ? "pause" : "resume");
          }
        }
        out.target = c.id;
      }
    }
    if (new_run) {
      // Ids come from the name and a run number: the lowest free one, so a
      // dry run and the apply that follows pick the same id, and so the same waves.
      int run = *existing ? (*existing)->runs + (current ? 1 : 0) : 1;
      for (;; ++run) {
        auto taken = store.get_campaign(declared_campaign_id(project, d.name, run));
        if (!taken) return taken.error();
        if (!*taken) break;
      }
      // Planned, then written unless this is a dry run: the plan's members
      // count the devices per wave, so a dry run writes no device store.
      auto plan = hub.plan_campaign(d.name, bundle.id, d.selector, d.strategy, project,
                                    declared_campaign_id(project, d.name, run));
      if (!plan) return plan.error().with_context(d.source + ": spec");
      if (!req.dry_run) {
        if (auto s = hub.write_campaign(*plan); !s) return s.error().with_context(d.source + ": spec");
      }
      row.runs = run;
      out.target = plan->record.id;
      if (d.paused) {
        if (!req.dry_run) {
          auto r = hub.campaign_action(out.target, "pause");
          if (!r) return r.error().with_context(d.source + ": spec.paused");
        }
        out.detail = out.detail.empty() ? "created paused" : out.detail + ", paused";
      }
      if (out.action == "unchanged") out.action = "configured";
      const auto per_wave = plan->per_wave(d.strategy.wave_count());
      for (int64_t n : per_wave) out.devices += n;
      name_waves(d, per_wave, out);
    }
    if (out.target.empty() && current) out.target = current->id;
    // Devices per wave of the run this object points at, over every cell.
    if (!new_run && !out.target.empty() && out.action != "unchanged") {
      auto counts = hub.campaign_counts(out.target);
      if (!counts) return counts.error();
      std::vector<int64_t> per_wave(static_cast<size_t>(d.strategy.wave_count()), 0);
      for (const auto& r : *counts) {
        if (r.wave >= 0 && r.wave < static_cast<int>(per_wave.size())) per_wave[static_cast<size_t>(r.wave)] += r.count;
        out.devices += r.count;
      }
      name_waves(d, per_wave, out);
    }
    row.target = out.target;
    if (auto s = store.put_applied(row); !s) return s.error();
    return out;
  }

  Result<ObjectOutcome> token(const Document& d, const std::string& project) {
    auto existing = owned(d, project);
    if (!existing) return existing.error();
    json spec = d.spec;
    const json desired{{"labels", d.labels}, {"spec", spec}};
    ObjectOutcome out;
    AppliedObject row;
    settle(out, row, *existing, d, project, desired);
    const std::string kind = token_kind(d.kind);
    std::optional<TokenRecord> tok;
    if (*existing) {
      auto t = store.get_token(kind, (*existing)->target);
      if (!t) return t.error();
      tok = *t;
    }
    if (tok && !tok->revoked) {
      out.target = tok->id;
      if (out.action != "unchanged") {
        TokenRecord rec = *tok;
        rec.name = d.name;
        rec.labels = d.token_labels;
        rec.max_uses = d.max_uses;
        if (d.kind == Kind::api_token) rec.role = d.role;
        // The expiry counts from creation: re-applying the same file never moves it.
        rec.expires_unix = d.ttl.count() > 0 ? rec.created_ms / 1000 + std::max<int64_t>(1, d.ttl.count() / 1000) : 0;
        if (auto s = store.update_token(rec); !s) return s.error();
      }
    } else {
      // New, or the token it made was revoked: a revoked secret never comes
      // back, so the object gets a new token (and a new secret).
      TokenRecord rec;
      rec.name = d.name;
      rec.role = d.kind == Kind::api_token ? d.role : "enroll";
      rec.project = project;
      rec.labels = d.token_labels;
      rec.max_uses = d.max_uses;
      auto created = hub.create_token(kind, rec, d.ttl);
      if (!created) return created.error().with_context(d.source);
      out.target = created->record.id;
      out.secret = created->secret;
      if (*existing) out.action = "created";  // whatever the files say, there is a new token
      if (tok) out.detail = "token " + tok->id + " was revoked; this is a new one";
    }
    row.target = out.target;
    if (auto s = store.put_applied(row); !s) return s.error();
    return out;
  }

  Result<ObjectOutcome> publication(const Document& d, const std::string& project) {
    auto existing = owned(d, project);
    if (!existing) return existing.error();
    auto up = hub.upload_bundle(d.bundle_bytes, project);
    if (!up) return at(d, up.error().code, "spec.file", up.error().message);
    const BundleRecord& b = up->first;
    if (b.project != project) {
      return at(d, Errc::conflict, "spec.file", "this bundle (" + b.id + ") is already published in another project");
    }
    // Agents fetch hub-hosted artifacts by hash; one missing would fail every device.
    if (artifacts) {
      v1::BundleManifest m;
      auto env = bundles::parse_envelope(d.bundle_bytes);
      if (env && m.ParseFromString(env->manifest())) {
        for (const auto& a : m.artifacts()) {
          if (a.url().find("://") != std::string::npos) continue;
          if (!artifacts->stat(to_hex(a.sha256()))) {
            return at(d, Errc::invalid_argument, "spec.file",
                      "artifact " + a.name() + " (sha256 " + to_hex(a.sha256()) +
                          ") is not on the hub; upload it first with 'flotilla bundle push " + d.file + "'");
          }
        }
      }
    }
    const json desired{{"labels", d.labels},
                       {"spec", d.spec},
                       {"bundle", {{"id", b.id}, {"name", b.name}, {"version", b.version}}}};
    ObjectOutcome out;
    AppliedObject row;
    settle(out, row, *existing, d, project, desired);
    out.target = row.target = b.id;
    out.detail = b.name + " v" + std::to_string(b.version);
    if (auto s = store.put_applied(row); !s) return s.error();
    return out;
  }

  Result<ObjectOutcome> git_repo(const Document& d, const std::string& project) {
    auto existing = owned(d, project);
    if (!existing) return existing.error();
    const json desired{{"labels", d.labels}, {"spec", d.spec}};
    ObjectOutcome out;
    AppliedObject row;
    settle(out, row, *existing, d, project, desired);
    // Deleted by hand (DELETE /v1/gitrepos/...) since the last apply: the files still declare it.
    auto stored = store.get_gitrepo(d.name);
    if (!stored) return stored.error();
    if (!*stored && out.action == "unchanged") out.action = "created";
    if (out.action != "unchanged") {
      GitRepoRecord r;
      r.name = d.name;
      r.project = project;
      r.url = d.repo.url;
      r.branch = d.repo.branch;
      r.path = d.repo.path;
      r.interval_ms = d.repo.interval.count();
      auto put = hub.put_gitrepo(r, false);
      if (!put) return at(d, put.error().code, "metadata.name", put.error().message);
    }
    out.target = row.target = d.name;
    if (auto s = store.put_applied(row); !s) return s.error();
    return out;
  }

  Result<ObjectOutcome> prune(const AppliedObject& o) {
    ObjectOutcome out;
    out.kind = parse_kind(o.kind).value_or(Kind::campaign);
    out.project = o.project;
    out.name = o.name;
    out.source = o.source;
    out.action = "pruned";
    out.generation = o.generation;
    out.observed_generation = o.observed_generation;
    out.target = o.target;
    out.live = display(parse_or_null(o.desired), o.apply_set);
    if (scope.role < role_for(out.kind)) {
      return make_error(Errc::permission_denied, "pruning " + o.kind + " " + o.project + "/" + o.name + " needs an " +
                                                     role_name(role_for(out.kind)) + " token");
    }
    switch (out.kind) {
      case Kind::campaign: {
        auto c = store.get_campaign(o.target);
        if (!c) return c.error();
        if (*c && (campaign_runs((*c)->state) || (*c)->state == CampaignState::paused)) {
          auto r = hub.campaign_action(o.target, "abort");
          if (!r) return r.error().with_context("prune " + o.kind + " " + o.name);
          out.detail = "aborted campaign " + o.target + " (it was " + std::string(state_name((*c)->state)) + ")";
        } else if (*c) {
          out.detail = "campaign " + o.target + " is " + std::string(state_name((*c)->state)) + "; left as it is";
        }
        break;
      }
      case Kind::enrollment_token:
      case Kind::api_token: {
        auto t = store.get_token(token_kind(out.kind), o.target);
        if (!t) return t.error();
        if (*t && !(*t)->revoked) {
          if (auto s = store.revoke_token(token_kind(out.kind), o.target); !s) return s.error();
          out.detail = "revoked token " + o.target;
        }
        break;
      }
      case Kind::bundle_publication:
        out.detail = "bundle " + o.target + " stays on the hub (campaigns and rollbacks refer to it)";
        break;
      case Kind::git_repo: {
        auto g = store.get_gitrepo(o.target);
        if (!g) return g.error();
        if (*g) {
          if (auto s = store.delete_gitrepo(o.target); !s) return s.error();
        }
        out.detail = "no longer synced; the objects it applied stay";
        break;
      }
    }
    if (auto s = store.delete_applied(o.kind, o.project, o.name); !s) return s.error();
    return out;
  }
};

}  // namespace

Result<ApplyOutcome> HubService::apply(const ApplyRequest& req, const ApplyScope& scope) {
  if (req.prune && req.apply_set.empty()) {
    return make_error(Errc::invalid_argument, "prune needs an apply set: only objects applied with the same set are "
                                              "ever pruned");
  }
  if (!req.apply_set.empty() && !(valid_label_value(req.apply_set) && req.apply_set.find('/') == std::string::npos)) {
    return make_error(Errc::invalid_argument, "apply set '" + req.apply_set + "' must be a label value (at most 63 "
                                              "of A-Z a-z 0-9 - _ .)");
  }

  // Everything that needs no store: projects, roles, duplicates.
  std::vector<std::pair<const Document*, std::string>> work;  // document, its project
  std::map<std::string, std::string> seen;                    // "Kind/project/name" -> source
  std::vector<std::string> problems;
  for (const auto& d : req.documents) {
    std::string project = d.project;
    if (project.empty()) project = scope.project == "*" ? "default" : scope.project;
    if (scope.project != "*" && project != scope.project) {
      problems.push_back(d.source + ": metadata.project: " + scope.owner + " is for project " + scope.project +
                         "; it cannot act for project " + project);
      continue;
    }
    if (scope.role < role_for(d.kind)) {
      const std::string role = role_name(scope.role);
      problems.push_back(d.source + ": kind: " + (role == "operator" || role == "admin" ? "an " : "a ") + role +
                         " token cannot apply " + kind_name(d.kind) +
                         " objects (needs " + role_name(role_for(d.kind)) + ")");
      continue;
    }
    const std::string key = kind_name(d.kind) + "/" + project + "/" + d.name;
    if (auto [it, fresh] = seen.emplace(key, d.source); !fresh) {
      problems.push_back(d.source + ": metadata.name: " + key + " is also declared by " + it->second);
      continue;
    }
    work.emplace_back(&d, project);
  }
  if (!problems.empty()) {
    std::string msg = problems.size() == 1 ? problems.front() : std::to_string(problems.size()) + " problems:";
    if (problems.size() > 1) {
      for (size_t i = 0; i < problems.size() && i < kMaxReportedErrors; ++i) msg += "\n  " + problems[i];
    }
    const bool denied = std::any_of(problems.begin(), problems.end(), [](const std::string& p) {
      return p.find(" is for project ") != std::string::npos || p.find(" token cannot apply ") != std::string::npos;
    });
    return make_error(denied ? Errc::permission_denied : Errc::invalid_argument, msg);
  }
  std::stable_sort(work.begin(), work.end(), [](const auto& a, const auto& b) {
    auto rank = [](Kind k) { return std::find(std::begin(kApplyOrder), std::end(kApplyOrder), k) - std::begin(kApplyOrder); };
    return rank(a.first->kind) < rank(b.first->kind);
  });

  ApplyOutcome out;
  out.dry_run = req.dry_run;
  out.apply_set = req.apply_set;
  // One control write: with the control log, every object of the apply is
  // one entry (a dry run leaves nothing, so it sends nothing).
  auto applied = control_write([&]() -> Status {
    std::lock_guard lock(store_mu_);
    out.objects.clear();
    sql::Transaction tx(store_.db());
    if (!tx.ok()) return make_error(Errc::unavailable, "the store is busy; retry", true);
    Applier a{*this, store_, req, scope, artifacts_, clock_.now_unix_ms()};
    for (const auto& [d, project] : work) {
      Result<ObjectOutcome> r = make_error(Errc::internal, "unhandled kind");
      switch (d->kind) {
        case Kind::campaign: r = a.campaign(*d, project); break;
        case Kind::enrollment_token:
        case Kind::api_token: r = a.token(*d, project); break;
        case Kind::bundle_publication: r = a.publication(*d, project); break;
        case Kind::git_repo: r = a.git_repo(*d, project); break;
      }
      if (!r) return r.error();
      out.objects.push_back(std::move(*r));
    }
    if (req.prune) {
      auto members = store_.list_applied(req.apply_set, false);
      if (!members) return members.error();
      // Campaigns first (they use the rest), then tokens, repositories, publications.
      std::stable_sort(members->begin(), members->end(), [](const AppliedObject& x, const AppliedObject& y) {
        auto rank = [](const std::string& k) {
          auto kind = parse_kind(k).value_or(Kind::campaign);
          return -(std::find(std::begin(kApplyOrder), std::end(kApplyOrder), kind) - std::begin(kApplyOrder));
        };
        return rank(x.kind) < rank(y.kind);
      });
      for (const auto& o : *members) {
        if (scope.project != "*" && o.project != scope.project) continue;
        if (seen.count(o.kind + "/" + o.project + "/" + o.name)) continue;
        auto r = a.prune(o);
        if (!r) return r.error();
        out.objects.push_back(std::move(*r));
      }
    }
    if (req.dry_run) {
      // Nothing of it stays: the transaction rolls back, and the secrets of
      // tokens that were never kept mean nothing.
      for (auto& o : out.objects) o.secret.clear();
      return {};
    }
    return tx.commit();
  });
  if (!applied) return applied.error();
  if (req.dry_run) {
    log::get("hub")->info("apply dry run by={} objects={} changes={}", scope.actor, out.objects.size(), out.changed());
    return out;
  }
  engine_cv_.notify_one();
  log::get("hub")->info("applied by={} applyset={} objects={} changes={}", scope.actor,
                        req.apply_set.empty() ? "-" : req.apply_set, out.objects.size(), out.changed());
  return out;
}

// ---- JSON -----------------------------------------------------------------------------

json outcome_json(const ApplyOutcome& o) {
  json items = json::array();
  for (const auto& x : o.objects) {
    json j{{"kind", kind_name(x.kind)},
           {"project", x.project},
           {"name", x.name},
           {"source", x.source},
           {"action", x.action},
           {"generation", x.generation},
           {"observed_generation", x.observed_generation},
           {"id", x.target},
           {"detail", x.detail},
           {"live", x.live},
           {"desired", x.desired}};
    if (x.kind == Kind::campaign && !x.waves.empty()) {
      json waves = json::array();
      for (const auto& [name, n] : x.waves) waves.push_back({{"name", name}, {"devices", n}});
      j["waves"] = waves;
      j["devices"] = x.devices;
    }
    if (!x.secret.empty()) j["secret"] = x.secret;
    items.push_back(std::move(j));
  }
  return json{{"dry_run", o.dry_run}, {"apply_set", o.apply_set}, {"changed", o.changed()}, {"objects", items}};
}

json applied_object_json(const AppliedObject& o) {
  json desired = json::parse(o.desired.empty() ? "{}" : o.desired, nullptr, false);
  if (desired.is_discarded()) desired = json::object();
  json labels = desired.value("labels", json::object());
  if (!o.apply_set.empty()) labels[kApplySetLabel] = o.apply_set;
  json j{{"apiVersion", kApiVersion},
         {"kind", o.kind},
         {"metadata",
          {{"name", o.name},
           {"project", o.project},
           {"labels", labels},
           {"generation", o.generation},
           {"created_at", o.created_ms},
           {"updated_at", o.updated_ms}}},
         {"spec", desired.value("spec", json::object())},
         {"status", {{"observed_generation", o.observed_generation}, {"id", o.target}, {"source", o.source}}}};
  if (desired.contains("bundle")) j["status"]["bundle"] = desired["bundle"];
  return j;
}

}  // namespace flotilla::hub
