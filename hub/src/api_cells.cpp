// Cells (docs/architecture.md, "Cells"): GET /v1/cells, POST /v1/cells/{id}/drain.
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

HttpResponse drain_cell(HubService& s, Context& c) {
  // Every project's devices move: not for an admin of one project.
  if (c.caller.project != "*") {
    return Api::error(403, "permission_denied", "draining a cell moves every project's devices; it needs an admin "
                                                "token of every project (*)");
  }
  const std::string& id = c.params.at(0);
  const auto parsed = coord::CellOwnership::parse_cell_id(id);
  if (!parsed) return Api::error(400, "invalid_argument", "cell id must be a number, got '" + id.substr(0, 64) + "'");
  const int cell = *parsed;
  auto p = s.drain_cell_devices(cell);
  if (!p) return from_error(p.error());
  c.audit_detail = "drain cell " + std::to_string(cell) + " (" + std::to_string(p->remaining) + " devices left)";
  return json_response(200, json{{"cell", p->cell}, {"draining", p->draining}, {"moved", p->moved},
                                 {"remaining", p->remaining}});
}

}  // namespace

void add_cell_routes(std::vector<Route>& r) {
  r.push_back({"GET", "/v1/cells", Role::operator_, {}, list_cells});
  r.push_back({"POST", "/v1/cells/{id}/drain", Role::admin, {}, drain_cell});
}

}  // namespace flotilla::hub::rest
