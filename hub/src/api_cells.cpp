// Cells (docs/architecture.md, "Cells"): GET /v1/cells, POST and DELETE /v1/cells/{id}/drain.
#include "api_internal.hpp"

namespace flotilla::hub::rest {

namespace {

json cell_json(const HubService::CellView& c) {
  return json{{"id", c.id},
              {"broker_url", c.broker_url},
              {"broker", c.broker_state},
              {"draining", c.draining},
              {"devices_total", c.devices_total},
              {"devices_online", c.devices_online}};
}

// Counts are of the caller's project only: a project-scoped token learns
// nothing about other projects' devices, only where its own are.
HttpResponse list_cells(HubService& s, Context& c) {
  auto cells = s.list_cells(c.caller.project);
  if (!cells) return from_error(cells.error());
  json items = json::array();
  for (const auto& cell : *cells) items.push_back(cell_json(cell));
  return json_response(200, json{{"items", items}});
}

// POST starts a drain, DELETE stops one; both answer the cell's progress.
HttpResponse drain_or_undrain(HubService& s, Context& c, bool drain) {
  // Every project's devices move: not for an admin of one project.
  if (c.caller.project != "*") {
    return Api::error(403, "permission_denied",
                      std::string(drain ? "draining a cell" : "stopping a cell's drain") +
                          " moves every project's devices; it needs an admin token of every project (*)");
  }
  const std::string& id = c.params.at(0);
  const auto parsed = coord::CellOwnership::parse_cell_id(id);
  if (!parsed) return Api::error(400, "invalid_argument", "cell id must be a number, got '" + id.substr(0, 64) + "'");
  const int cell = *parsed;
  auto p = drain ? s.drain_cell_devices(cell) : s.undrain_cell(cell);
  if (!p) return from_error(p.error());
  c.audit_detail = std::string(drain ? "drain" : "stop draining") + " cell " + std::to_string(cell) + " (" +
                   std::to_string(p->remaining) + " devices in it)";
  return json_response(200, json{{"cell", p->cell}, {"draining", p->draining}, {"moved", p->moved},
                                 {"remaining", p->remaining}});
}

HttpResponse drain_cell(HubService& s, Context& c) { return drain_or_undrain(s, c, true); }
HttpResponse undrain_cell(HubService& s, Context& c) { return drain_or_undrain(s, c, false); }

}  // namespace

void add_cell_routes(std::vector<Route>& r) {
  r.push_back({"GET", "/v1/cells", Role::operator_, {}, list_cells});
  r.push_back({"POST", "/v1/cells/{id}/drain", Role::admin, {}, drain_cell});
  r.push_back({"DELETE", "/v1/cells/{id}/drain", Role::admin, {}, undrain_cell});
}

}  // namespace flotilla::hub::rest
