// flotilla cell list|drain: the hub's cells (docs/operations.md, "Cells").
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "cli.hpp"
#include "client.hpp"
#include "output.hpp"
#include "flotilla/common/options.hpp"

namespace flotilla::cli {

using nlohmann::json;

namespace {

std::string text(const json& j, const char* k) {
  if (!j.contains(k)) return "";
  return j[k].is_string() ? j[k].get<std::string>() : j[k].dump();
}

int cell_list(int argc, char** argv) {
  Options o("flotilla cell list",
            "Usage: flotilla cell list\n\n"
            "The hub's cells: each cell's broker, its state, whether it drains, and its devices (of your\n"
            "token's project) in total and online. Operators and admins.",
            "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("GET", "/v1/cells");
  if (!r) return fail(r.error().message);
  if (print_structured(o, *r)) return 0;
  Table t({"CELL", "BROKER", "STATE", "DRAINING", "DEVICES", "ONLINE"});
  for (const auto& cell : (*r)["items"]) {
    t.add({text(cell, "id"), text(cell, "broker_url"), text(cell, "broker"),
           cell.value("draining", false) ? "yes" : "no", text(cell, "devices_total"), text(cell, "devices_online")});
  }
  t.print(std::cout);
  return 0;
}

int cell_drain(int argc, char** argv) {
  Options o("flotilla cell drain",
            "Usage: flotilla cell drain ID [--no-wait] [--timeout 10m]\n\n"
            "Stops new enrollments in cell ID and moves each of its devices to the least loaded other\n"
            "cell: the device is told its new broker in a signed desired state and reconnects there.\n"
            "Shows progress (moved/remaining) until the cell is empty, unless --no-wait. Admin only;\n"
            "the last undrained cell cannot be drained.",
            "FLOTILLA_");
  add_hub_flags(o);
  o.add_switch("no-wait", "return once the drain has started").add("timeout", "give up waiting after this long", "10m");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto timeout = o.get_duration("timeout");
  if (!timeout) return fail("timeout: " + timeout.error().message, 2);
  for (char ch : pos[0]) {
    if (ch < '0' || ch > '9' || pos[0].size() > 3) return fail("cell id must be a number, got '" + pos[0] + "'", 2);
  }
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("POST", "/v1/cells/" + pos[0] + "/drain", "{}");
  if (!r) return fail(r.error().message);
  if (o.get_bool("no-wait")) {
    if (print_structured(o, *r)) return 0;
    std::cout << "cell " << pos[0] << " draining: " << text(*r, "moved") << " moved, " << text(*r, "remaining")
              << " remaining\n";
    return 0;
  }
  const auto deadline = std::chrono::steady_clock::now() + *timeout;
  std::string last;
  const int64_t first_remaining = (*r)["remaining"].get<int64_t>();
  const int64_t first_moved = (*r)["moved"].get<int64_t>();
  for (;;) {
    // Progress from the cell list: polling never repeats the (audited) drain call.
    auto cells = c->call("GET", "/v1/cells");
    if (!cells) return fail(cells.error().message);
    json now;
    for (const auto& cell : (*cells)["items"]) {
      if (text(cell, "id") == pos[0]) now = cell;
    }
    if (now.is_null()) return fail("the hub no longer lists cell " + pos[0]);
    const int64_t remaining = now["devices_total"].get<int64_t>();
    json progress{{"cell", now["id"]}, {"draining", now["draining"]},
                  {"moved", first_moved + std::max<int64_t>(0, first_remaining - remaining)}, {"remaining", remaining}};
    const std::string line = "cell " + pos[0] + " draining: " + text(progress, "moved") + " moved, " +
                             text(progress, "remaining") + " remaining";
    if (line != last) std::cerr << line << "\n";
    last = line;
    if (remaining == 0) {
      if (print_structured(o, progress)) return 0;
      std::cout << "cell " << pos[0] << " is empty\n";
      return 0;
    }
    if (std::chrono::steady_clock::now() > deadline) return fail("cell " + pos[0] + " still has devices: " + line);
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
}

}  // namespace

int cmd_cell(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "list") return cell_list(argc, argv);
  if (sub == "drain") return cell_drain(argc, argv);
  return fail("usage: flotilla cell list|drain ... (--help for each)", 2);
}

}  // namespace flotilla::cli
