// Devices: list, get, edit labels, decommission.
#include <algorithm>
#include <future>
#include <map>
#include <set>

#include "api_internal.hpp"
#include "flotilla/hub/aggregates.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/http_client.hpp"
#include "flotilla/common/log.hpp"

namespace flotilla::hub::rest {

namespace {

json device_json(const DeviceRecord& d) {
  return json{{"id", d.id},
              {"project", d.project},
              {"labels", d.labels},
              {"hostname", d.hostname},
              {"arch", d.arch},
              {"agent_version", d.agent_version},
              {"online", d.online},
              {"state", d.state},
              {"applied_bundle", d.applied_bundle},
              {"applied_version", d.applied_version},
              {"k3s_version", d.k3s_version},
              {"node_ready", d.node_ready},
              {"last_reason", d.last_reason},
              {"last_message", d.last_message},
              {"enrolled_at", iso_ms(d.enrolled_ms)},
              {"last_seen_at", iso_ms(d.last_seen_ms)},
              {"campaign_id", d.campaign_id},
              {"generation", d.generation},
              {"cell", d.cell},
              // The device_inventory row (all zeros/"" until the device sends one).
              {"k3s_role", d.inventory.k3s_role},
              {"cluster_id", d.inventory.cluster_id},
              {"k3s_cert_expires_at", iso_s(d.inventory.cert_expiry_unix)},
              {"os", d.inventory.os},
              {"disk_free_bytes", d.inventory.disk_free_bytes},
              {"disk_total_bytes", d.inventory.disk_total_bytes},
              {"mem_free_bytes", d.inventory.mem_free_bytes},
              {"mem_total_bytes", d.inventory.mem_total_bytes},
              {"clock_suspect", d.inventory.clock_suspect}};
}

// Set on a read one hub process forwards to another: the one that receives
// it answers from its own store, so a read is forwarded once.
constexpr const char* kForwardedHeader = "x-flotilla-forwarded";

// Where a forwarded read may carry the caller's token: TLS, or this machine.
bool safe_peer(const std::string& url) {
  auto u = http::parse_url(url);
  if (!u) return false;
  return u->scheme == "https" || u->host == "127.0.0.1" || u->host == "localhost" || u->host == "::1" ||
         u->host == "[::1]";
}

// Why a forwarded read cannot go to `peer` (the hub holding `cell`), or ""
// when it can.
std::string cannot_forward(const Context& c, const std::string& peer, int cell) {
  if (c.req.headers.count(kForwardedHeader)) {
    return "forwarded by another hub process, but this one does not hold cell " + std::to_string(cell) +
           " either (it changed hands)";
  }
  if (peer.empty()) return "no hub process holds cell " + std::to_string(cell) + " right now";
  if (!safe_peer(peer)) {
    return "the hub holding cell " + std::to_string(cell) + " serves plain HTTP on another machine";
  }
  if (!c.req.headers.count("authorization")) {
    return "this request has no bearer token to forward to the hub holding cell " + std::to_string(cell);
  }
  return "";
}

// GET `path` on the hub at `peer` with the caller's token, marked forwarded.
Result<http::Response> ask_peer(HubService& s, const Context& c, const std::string& peer, const std::string& path,
                                size_t max_bytes) {
  http::Request r;
  r.url = peer + path;
  r.headers["authorization"] = c.req.headers.at("authorization");
  r.headers[kForwardedHeader] = "1";
  r.timeout = std::chrono::seconds(3);
  r.max_response_bytes = max_bytes;
  r.ca_file = s.peer_ca_file();
  return http::send(r);
}

void mark_stale(json& d, const std::string& why) {
  d["stale"] = true;
  d["stale_reason"] = why + "; presence and state as last known here";
}

// Hub processes sharing cells (docs/operations.md, "Several hub processes"):
// this hub's store has every device's control columns (the control log),
// but presence, state and inventory are current only for the cells it
// holds. Each hub holding other cells is asked, in parallel and with the
// caller's token, for the same page restricted to its cells (`held=true`)
// over this page's id range; its devices replace this hub's rows of them. A
// cell whose holder cannot be asked keeps this hub's rows, marked stale with
// the reason. The page ends where the shortest answer ended (a holder's own
// `next`), so following `next` visits every device once.
void fresh_from_holders(HubService& s, const Context& c, const std::string& after, int64_t limit,
                        std::vector<json>& items, std::string& next) {
  std::map<std::string, std::vector<int>> by_peer;  // holder URL -> its cells
  std::map<int, std::string> unasked;                // cell -> why it was not asked
  const auto owners = c.req.headers.count(kForwardedHeader) ? std::map<int, std::string>() : s.cell_owner_urls();
  for (int cell = 0; cell < s.cell_count(); ++cell) {
    if (s.serves_cell(cell)) continue;
    const auto owner = owners.find(cell);
    const std::string peer = owner == owners.end() ? "" : owner->second;
    const std::string why = cannot_forward(c, peer, cell);
    if (why.empty()) {
      by_peer[peer].push_back(cell);
    } else {
      unasked[cell] = why;
    }
  }
  // The same filters, this page's range, the holder's cells only.
  std::string query = "held=true&limit=" + std::to_string(limit);
  for (const auto& [k, v] : c.target.query) {
    if (k != "after" && k != "until" && k != "limit" && k != "held") query += "&" + k + "=" + url_encode(v);
  }
  if (!after.empty()) query += "&after=" + url_encode(after);
  if (!next.empty()) query += "&until=" + url_encode(next);
  std::vector<std::pair<std::string, std::future<Result<http::Response>>>> asked;
  for (const auto& [peer, cells] : by_peer) {
    asked.emplace_back(peer, std::async(std::launch::async, [&s, &c, peer = peer, &query] {
                         return ask_peer(s, c, peer, "/v1/devices?" + query, 64u << 20);
                       }));
  }
  std::set<int> answered;
  std::vector<json> theirs;
  std::string cut = next;  // "" = no end
  for (auto& [peer, f] : asked) {
    const auto& cells = by_peer[peer];
    auto answer = f.get();
    json body = answer && answer->status == 200 ? json::parse(answer->body, nullptr, false) : json();
    if (!body.is_object() || !body.contains("items") || !body["items"].is_array() || !body.contains("held_cells")) {
      const std::string why = "the hub holding it did not answer (" +
                              (!answer ? answer.error().message
                                       : answer->status == 200 ? std::string("not a page")
                                                               : "HTTP " + std::to_string(answer->status)) +
                              ")";
      log::get("api")->warn("device page from {}: {}", peer, why);
      for (int cell : cells) unasked[cell] = "cell " + std::to_string(cell) + ": " + why;
      continue;
    }
    std::set<int> now_held;
    for (const auto& h : body["held_cells"]) {
      if (h.is_number_integer()) now_held.insert(h.get<int>());
    }
    for (int cell : cells) {
      if (now_held.count(cell)) {
        answered.insert(cell);
      } else {
        unasked[cell] = "cell " + std::to_string(cell) + " changed hands while it was asked";
      }
    }
    for (auto& d : body["items"]) {
      if (d.is_object() && d.contains("id") && d["id"].is_string() && d.contains("cell") &&
          d["cell"].is_number_integer() && answered.count(d["cell"].get<int>()) &&
          std::find(cells.begin(), cells.end(), d["cell"].get<int>()) != cells.end()) {
        theirs.push_back(std::move(d));
      }
    }
    const std::string their_next = body.value("next", "");
    if (!their_next.empty() && (cut.empty() || their_next < cut)) cut = their_next;
  }
  std::vector<json> merged;
  for (auto& d : items) {
    const int cell = d["cell"].get<int>();
    if (s.serves_cell(cell)) {
      merged.push_back(std::move(d));
    } else if (!answered.count(cell)) {
      auto why = unasked.find(cell);
      mark_stale(d, why != unasked.end() ? why->second : "cell " + std::to_string(cell) + " was not asked");
      merged.push_back(std::move(d));
    }
  }
  for (auto& d : theirs) merged.push_back(std::move(d));
  std::sort(merged.begin(), merged.end(),
            [](const json& a, const json& b) { return a["id"].get<std::string>() < b["id"].get<std::string>(); });
  if (!cut.empty()) {
    while (!merged.empty() && merged.back()["id"].get<std::string>() > cut) merged.pop_back();
  }
  next = cut;
  if (static_cast<int64_t>(merged.size()) > limit) {
    merged.resize(static_cast<size_t>(limit));
    next = merged.back()["id"].get<std::string>();
  }
  items = std::move(merged);
}

HttpResponse list_devices(HubService& s, Context& c) {
  const auto& q = c.target.query;
  auto sel = Selector::parse(q.count("selector") ? q.at("selector") : "");
  if (!sel) return from_error(sel.error());
  auto limit = int_param(c, "limit", 500, 1, kMaxDevicePage);
  if (!limit) return from_error(limit.error());
  // Decommissioned devices are history, not fleet: shown only when asked for.
  bool include_decommissioned = false;
  if (q.count("include_decommissioned")) {
    const auto& v = q.at("include_decommissioned");
    if (v != "true" && v != "false") {
      return Api::error(400, "invalid_argument", "include_decommissioned must be true or false");
    }
    include_decommissioned = v == "true";
  }
  // certExpiresBefore=<RFC 3339 time or unix seconds>: devices whose k3s
  // certificates expire before then (devices that reported none are left out).
  std::optional<int64_t> cert_before;
  if (q.count("certExpiresBefore")) {
    const std::string v = q.at("certExpiresBefore");
    int64_t t = 0;
    if (auto parsed = bundles::parse_rfc3339(v)) {
      t = *parsed;
    } else {
      try {
        size_t used = 0;
        t = std::stoll(v, &used);
        if (used != v.size()) t = -1;
      } catch (const std::exception&) {
        t = -1;
      }
    }
    if (t <= 0) {
      return Api::error(400, "invalid_argument",
                        "certExpiresBefore must be an RFC 3339 time (2026-01-31T00:00:00Z) or unix seconds");
    }
    cert_before = t;
  }
  const std::string after = q.count("after") ? q.at("after") : "";
  const std::string until = q.count("until") ? q.at("until") : "";
  if (after.size() > 256 || until.size() > 256) {
    return Api::error(400, "invalid_argument", "after and until are device ids (at most 256 bytes)");
  }
  bool held_only = false;
  if (q.count("held")) {
    if (q.at("held") != "true" && q.at("held") != "false") {
      return Api::error(400, "invalid_argument", "held must be true or false");
    }
    held_only = q.at("held") == "true";
  }
  auto caller = reading_caller(c);
  if (!caller) return from_error(caller.error());
  // One bounded walk in SQL on a read connection (never the whole fleet,
  // never waiting for the store's writer): in id order, continuing after
  // `after`. A selector no index serves stops after the scan limit with a
  // shorter page and a `next` to go on from.
  AggregateStore* reads = s.reads();
  if (!reads) return Api::error(503, "unavailable", "this hub's store has no read connection");
  DeviceQuery dq;
  dq.project = caller->project;
  dq.selector = *sel;
  dq.include_decommissioned = include_decommissioned;
  dq.cert_before_unix = cert_before;
  dq.id_order = true;
  dq.after_id = after;
  dq.until_id = until;
  std::vector<int> held;
  for (int cell = 0; cell < s.cell_count(); ++cell) {
    if (s.serves_cell(cell)) held.push_back(cell);
  }
  if (held_only) dq.cells = held;
  dq.limit = *limit + 1;  // one more: whether anything follows this page
  dq.scan_limit = reads->device_scan_limit();
  auto page = reads->devices(dq);
  if (!page) return from_error(page.error());
  std::string next = page->complete ? "" : page->next_id;  // cut short by the scan limit
  if (static_cast<int64_t>(page->items.size()) > *limit) {
    page->items.resize(static_cast<size_t>(*limit));
    next = page->items.back().id;
  }
  std::vector<json> items;
  for (const auto& d : page->items) items.push_back(device_json(d));
  json body{{"next", next}};
  if (held_only) {
    body["held_cells"] = held;
  } else if (s.shares_cells()) {
    fresh_from_holders(s, c, after, *limit, items, next);
    body["next"] = next;
  }
  body["items"] = std::move(items);
  return json_response(200, body);
}

// The device if the caller's project may see it. Another project's device is
// "not found", not "forbidden": its existence is not ours to tell.
Result<DeviceRecord> visible_device(HubService& s, const Caller& caller, const std::string& id) {
  auto d = s.get_device(id);
  if (!d) return d.error();
  if (!*d || !caller.sees((*d)->project)) return make_error(Errc::not_found, "no device '" + id + "'");
  return **d;
}

// Hub processes that share cells (docs/operations.md, "Several hub
// processes"): a device's presence and state are reported to the hub that
// holds its cell, so a read of a device whose cell this hub does not hold is
// answered by that hub, with the caller's own token. When it cannot be
// asked (the cell is between owners, the owner does not answer in time, or
// it would carry a token over plain HTTP to another machine), this hub
// answers with what it last knew, marked stale, and says why.
HttpResponse device_from_owner(HubService& s, const Context& c, const DeviceRecord& d) {
  const bool forwarded = c.req.headers.count(kForwardedHeader) > 0;
  const std::string peer = forwarded ? "" : s.cell_owner_url(d.cell);
  std::string why = cannot_forward(c, peer, d.cell);
  if (why.empty()) {
    auto answer = ask_peer(s, c, peer, "/v1/devices/" + d.id, 1u << 20);
    if (answer && (answer->status == 200 || answer->status == 404)) {
      HttpResponse out;
      out.status = answer->status;
      out.body = std::move(answer->body);
      return out;
    }
    why = "the hub holding cell " + std::to_string(d.cell) + " did not answer (" +
          (answer ? "HTTP " + std::to_string(answer->status) : answer.error().message) + ")";
    log::get("api")->warn("device={} read from {}: {}", d.id, peer, why);
  }
  json j = device_json(d);
  mark_stale(j, why);
  return json_response(200, j);
}

HttpResponse get_device(HubService& s, Context& c) {
  auto caller = reading_caller(c);
  if (!caller) return from_error(caller.error());
  auto d = visible_device(s, *caller, c.params[0]);
  if (!d) return from_error(d.error());
  if (s.shares_cells() && !s.serves_cell(d->cell)) {
    return device_from_owner(s, c, *d);
  }
  return json_response(200, device_json(*d));
}

HttpResponse patch_device(HubService& s, Context& c) {
  auto j = parse_body(c.req, {"labels"});
  if (!j) return from_error(j.error());
  if (!j->contains("labels") || !(*j)["labels"].is_object()) {
    return Api::error(400, "invalid_argument", "'labels' must be an object of label: value (or null to remove)");
  }
  std::map<std::string, std::optional<std::string>> changes;
  for (const auto& [k, v] : (*j)["labels"].items()) {
    if (v.is_null()) changes[k] = std::nullopt;
    else if (v.is_string()) changes[k] = v.get<std::string>();
    else return Api::error(400, "invalid_argument", "label '" + k + "' must be a string or null");
  }
  if (changes.empty()) return Api::error(400, "invalid_argument", "'labels' is empty: nothing to change");
  auto d = visible_device(s, c.caller, c.params[0]);
  if (!d) return from_error(d.error());
  auto updated = s.edit_device_labels(d->id, changes);
  if (!updated) return from_error(updated.error());
  std::string set, removed;
  for (const auto& [k, v] : changes) {
    auto& out = v ? set : removed;
    out += (out.empty() ? "" : ",") + k;
  }
  c.audit_detail = "device " + d->id + " labels set=[" + set + "] removed=[" + removed + "]";
  return json_response(200, device_json(*updated));
}

HttpResponse decommission_device(HubService& s, Context& c) {
  auto d = visible_device(s, c.caller, c.params[0]);
  if (!d) return from_error(d.error());
  c.audit_detail = "decommission device " + d->id;
  auto done = s.decommission_device(d->id);
  if (!done) return from_error(done.error());
  return json_response(200, device_json(*done));
}

}  // namespace

void add_device_routes(std::vector<Route>& r) {
  r.push_back({"GET", "/v1/devices", Role::viewer,
               {"selector", "limit", "after", "until", "held", "include_decommissioned", "certExpiresBefore", "project"},
               list_devices});
  r.push_back({"GET", "/v1/devices/{id}", Role::viewer, {"project"}, get_device});
  r.push_back({"PATCH", "/v1/devices/{id}", Role::operator_, {}, patch_device});
  r.push_back({"DELETE", "/v1/devices/{id}", Role::operator_, {}, decommission_device});
}

}  // namespace flotilla::hub::rest
