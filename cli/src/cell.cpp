// flotilla cell list|drain|crl-sync: the hub's cells (docs/operations.md,
// "Cells"), and the revocation list of a cell broker the hub does not run.
#include <signal.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "cli.hpp"
#include "client.hpp"
#include "output.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/http_client.hpp"
#include "flotilla/common/options.hpp"
#include "flotilla/common/x509.hpp"

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

bool valid_cell_id(const std::string& id) {
  return !id.empty() && id.size() <= 3 && std::all_of(id.begin(), id.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
}

int cell_undrain(int argc, char** argv) {
  Options o("flotilla cell undrain",
            "Usage: flotilla cell undrain ID\n\n"
            "Stops the drain of cell ID: it takes new enrollments again and its devices are no longer\n"
            "asked to move. Moves already asked for and not yet taken are withdrawn (the device's desired\n"
            "state is sent again without the move); devices that already moved stay in their new cell.\n"
            "A cell that is not draining is left as it is. Admin only.",
            "FLOTILLA_");
  add_hub_flags(o);
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  if (!valid_cell_id(pos[0])) return fail("cell id must be a number, got '" + pos[0] + "'", 2);
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  auto r = c->call("DELETE", "/v1/cells/" + pos[0] + "/drain");
  if (!r) return fail(r.error().message);
  if (print_structured(o, *r)) return 0;
  std::cout << "cell " << pos[0] << " is not draining: " << text(*r, "remaining") << " devices in it, "
            << text(*r, "moved") << " moved out since the hub started\n";
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
  if (!valid_cell_id(pos[0])) return fail("cell id must be a number, got '" + pos[0] + "'", 2);
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

int cell_crl_sync(int argc, char** argv) {
  Options o("flotilla cell crl-sync",
            "Usage: flotilla cell crl-sync --out FILE --device-ca FILE [--reload-pid-file FILE]\n"
            "                              [--hub URL] [--ca-file FILE]\n\n"
            "Keeps the revocation list of a cell broker the hub does not run (a mosquitto under systemd,\n"
            "docs/operations.md \"Several hub processes\") in step with the hub. Fetches the hub's\n"
            "GET /v1/device-ca/crl (public: no token) and installs it only after checking it: every list\n"
            "signed by a CA in --device-ca (the broker's cafile), none expired, none older than the one\n"
            "installed (an old list replayed would let devices revoked since back in). Writes --out\n"
            "atomically (0644) only when it changed, then sends SIGHUP to the pid in --reload-pid-file\n"
            "(mosquitto re-reads its crlfile). Run it from a timer every few minutes: the hub re-issues\n"
            "the list at every revocation and daily.\n\n"
            "Exit status: 0 installed or unchanged; 1 refused, unreachable or not reloaded (a refused list\n"
            "changes nothing); 2 bad usage.",
            "FLOTILLA_");
  o.add("hub", "hub REST base URL", "http://127.0.0.1:8080")
      .add("ca-file", "PEM CA certificate(s) to verify an https hub against (default: the system CA store)")
      .add("out", "the broker's crlfile to keep current")
      .add("device-ca", "PEM device CA certificate(s) the lists must be signed by (the broker's cafile)")
      .add("reload-pid-file", "file holding the broker's pid, to send SIGHUP after a change");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  const std::string out = o.get("out"), ca_path = o.get("device-ca"), pid_path = o.get("reload-pid-file");
  if (out.empty() || ca_path.empty()) return fail("--out and --device-ca are required (--help)", 2);
  auto ca = fs::read_file(ca_path, x509::kMaxPemBytes);
  if (!ca) return fail("device-ca: " + ca.error().message, 2);
  std::string hub = o.get("hub");
  while (!hub.empty() && hub.back() == '/') hub.pop_back();
  http::Request r;
  r.url = hub + "/v1/device-ca/crl";
  r.ca_file = o.get("ca-file");
  r.max_response_bytes = x509::kMaxCrlBundleBytes;
  r.timeout = std::chrono::seconds(30);
  auto got = http::send(r);
  if (!got) return fail("cannot reach the hub at " + hub + ": " + got.error().message);
  if (got->status != 200) return fail("the hub answered " + std::to_string(got->status) + " for " + r.url);
  std::string installed;
  if (std::filesystem::exists(out)) {
    auto now_there = fs::read_file(out, x509::kMaxCrlBundleBytes);
    if (!now_there) return fail("read " + out + ": " + now_there.error().message);
    installed = std::move(*now_there);
  }
  auto checked = x509::check_crl_bundle(got->body, *ca, SystemClock::instance().now_unix(), installed);
  if (!checked) return fail("refused the hub's revocation list, " + out + " unchanged: " + checked.error().message);
  size_t revoked = 0;
  int64_t next_update = 0;
  for (const auto& c : *checked) {
    revoked = std::max(revoked, c.revoked);  // each CA's list names every revoked serial
    next_update = next_update == 0 ? c.next_update_unix : std::min(next_update, c.next_update_unix);
  }
  const std::string what = std::to_string(checked->size()) + " list(s), " + std::to_string(revoked) +
                           " revoked, next update " + bundles::format_rfc3339(next_update);
  if (got->body == installed) {
    std::cout << out << " unchanged (" << what << ")\n";
    return 0;
  }
  if (auto w = fs::write_file_atomic(out, got->body, 0644); !w) return fail("write " + out + ": " + w.error().message);
  std::cout << "wrote " << out << " (" << what << ")\n";
  if (pid_path.empty()) return 0;
  auto pid_text = fs::read_file(pid_path, 64);
  if (!pid_text) return fail("wrote " + out + " but cannot read " + pid_path + ": " + pid_text.error().message);
  long pid = 0;
  try {
    pid = std::stol(*pid_text);
  } catch (const std::exception&) {
    pid = 0;
  }
  if (pid <= 1) return fail("wrote " + out + " but " + pid_path + " holds no pid");
  if (::kill(static_cast<pid_t>(pid), SIGHUP) != 0) {
    return fail("wrote " + out + " but could not signal pid " + std::to_string(pid) + ": " + std::strerror(errno));
  }
  std::cout << "sent SIGHUP to pid " << pid << "\n";
  return 0;
}

}  // namespace

int cmd_cell(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "list") return cell_list(argc, argv);
  if (sub == "drain") return cell_drain(argc, argv);
  if (sub == "undrain") return cell_undrain(argc, argv);
  if (sub == "crl-sync") return cell_crl_sync(argc, argv);
  return fail("usage: flotilla cell list|drain|undrain|crl-sync ... (--help for each)", 2);
}

}  // namespace flotilla::cli
