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

}  // namespace

void add_cell_routes(std::vector<Route>& r) {
  r.push_back({"GET", "/v1/cells", Role::operator_, list_cells});
}

}  // namespace flotilla::hub::rest
