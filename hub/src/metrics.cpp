// /metrics in the Prometheus text exposition format 0.0.4
// (https://prometheus.io/docs/instrumenting/exposition_formats/).
#include "flotilla/hub/metrics.hpp"

#include "flotilla/hub/aggregates.hpp"
#include "flotilla/hub/control_log.hpp"
#include "flotilla/hub/broker.hpp"

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <fstream>
#include <sstream>

#include "flotilla/common/version.hpp"
#include "flotilla/hub/service.hpp"

namespace flotilla::hub {

void Histogram::observe(double v) {
  std::lock_guard lock(mu_);
  for (size_t i = 0; i < bounds_.size(); ++i) {
    if (v <= bounds_[i]) {
      ++buckets_[i];
      break;
    }
  }
  ++count_;
  sum_ += v;
}

Histogram::Snapshot Histogram::snapshot() const {
  std::lock_guard lock(mu_);
  Snapshot s;
  s.bounds = bounds_;
  uint64_t running = 0;
  for (auto b : buckets_) {
    running += b;
    s.cumulative.push_back(running);
  }
  s.count = count_;
  s.sum = sum_;
  return s;
}

void HttpMetrics::count(const std::string& method, const std::string& route, int status) {
  // The exact status (404 and 409 are different stories), as Prometheus's own
  // client libraries label it; the set is bounded by the routes and the
  // handful of statuses the hub answers with.
  const std::string code = std::to_string(status);
  std::lock_guard lock(mu_);
  ++requests_[{method, route, code}];
}

void HttpMetrics::count_audit_failure() {
  std::lock_guard lock(mu_);
  ++audit_failures_;
}

std::map<std::tuple<std::string, std::string, std::string>, uint64_t> HttpMetrics::snapshot() const {
  std::lock_guard lock(mu_);
  return requests_;
}

void HttpMetrics::count_rate_limited(const std::string& limit) {
  std::lock_guard lock(mu_);
  ++rate_limited_[limit];
}

std::map<std::string, uint64_t> HttpMetrics::rate_limited() const {
  std::lock_guard lock(mu_);
  return rate_limited_;
}

uint64_t HttpMetrics::audit_failures() const {
  std::lock_guard lock(mu_);
  return audit_failures_;
}

ProcessStats read_process_stats() {
  ProcessStats st;
  const long page = ::sysconf(_SC_PAGESIZE);
  const long ticks = ::sysconf(_SC_CLK_TCK);
  if (std::ifstream statm("/proc/self/statm"); statm) {
    uint64_t size = 0, resident = 0;
    if (statm >> size >> resident) {
      st.virtual_memory_bytes = double(size) * double(page);
      st.resident_memory_bytes = double(resident) * double(page);
    }
  }
  // /proc/self/stat: the command name is in parentheses and may hold spaces,
  // so fields are counted from the last ')'. utime and stime are fields 14
  // and 15, starttime (ticks after boot) field 22.
  if (std::ifstream stat("/proc/self/stat"); stat) {
    std::string line;
    std::getline(stat, line);
    const auto close = line.rfind(')');
    if (close != std::string::npos && ticks > 0) {
      std::istringstream rest(line.substr(close + 2));
      std::vector<std::string> f;
      for (std::string w; rest >> w;) f.push_back(w);
      // rest starts at field 3 (state): field n is f[n - 3].
      if (f.size() >= 20) {
        try {
          st.cpu_seconds = double(std::stoull(f[11]) + std::stoull(f[12])) / double(ticks);
          const double start_after_boot = double(std::stoull(f[19])) / double(ticks);
          std::ifstream pstat("/proc/stat");
          for (std::string key; pstat >> key;) {
            if (key == "btime") {
              double btime = 0;
              if (pstat >> btime) st.start_time_seconds = btime + start_after_boot;
              break;
            }
            pstat.ignore(1 << 20, '\n');
          }
        } catch (const std::exception&) {
        }
      }
    }
  }
  if (DIR* d = ::opendir("/proc/self/fd")) {
    double n = 0;
    while (const dirent* e = ::readdir(d)) {
      if (e->d_name[0] != '.') ++n;
    }
    ::closedir(d);
    st.open_fds = n - 1;  // not the descriptor opendir itself holds
  }
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    st.max_fds = rl.rlim_cur == RLIM_INFINITY ? -1 : double(rl.rlim_cur);
  }
  return st;
}

std::string prom_escape(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out.push_back(c);
  }
  return out;
}

namespace {

// The shortest decimal that round-trips (0.0005, not 0.00050000000000000001);
// "+Inf", "-Inf" and "NaN" are the format's own spellings.
std::string num(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

class Page {
 public:
  void family(const std::string& name, const std::string& type, const std::string& help) {
    out_ << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n";
  }
  void sample(const std::string& name, const std::vector<std::pair<std::string, std::string>>& labels, double v) {
    out_ << name;
    if (!labels.empty()) {
      out_ << "{";
      for (size_t i = 0; i < labels.size(); ++i) {
        out_ << (i ? "," : "") << labels[i].first << "=\"" << prom_escape(labels[i].second) << "\"";
      }
      out_ << "}";
    }
    out_ << " " << num(v) << "\n";
  }
  std::string str() const { return out_.str(); }

 private:
  std::ostringstream out_;
};

}  // namespace

std::string render_metrics(HubService& s, const HttpMetrics& http) {
  Page p;
  p.family("flotilla_build_info", "gauge", "Always 1; the version label is the hub's build.");
  p.sample("flotilla_build_info", {{"version", version()}}, 1);

  // Devices by state and presence. A failed read shows as a missing family
  // plus flotilla_scrape_errors, never as a 500 that hides everything else.
  int scrape_errors = 0;
  // From the fleet's counts (kept by the store's triggers) on a read
  // connection: a scrape neither loads the devices nor waits for the
  // store's writer, at any fleet size.
  AggregateStore* reads = s.reads();
  auto fleet = reads ? reads->fleet("*") : Result<std::vector<FleetCount>>(make_error(Errc::unavailable, "no store"));
  auto suspect = reads ? reads->clock_suspect_devices() : Result<int64_t>(make_error(Errc::unavailable, "no store"));
  if (fleet && suspect) {
    std::map<std::string, int64_t> by_state;
    int64_t online = 0, offline = 0;
    for (const auto& f : *fleet) {
      if (f.dim == "state") {
        by_state[f.value] += f.n;
      } else if (f.dim == "online") {
        (f.value == "online" ? online : offline) += f.n;
      }
    }
    // By UTC day, as the dashboard's fleet view counts them.
    const CertExpiryCounts certs = cert_expiry_counts(*fleet, "cert_day", s.clock().now_unix());
    const int64_t certs_expiring = certs.expired + certs.within_7_days + certs.within_30_days;
    p.family("flotilla_devices", "gauge", "Devices by last reported agent state.");
    for (const auto& [state, n] : by_state) p.sample("flotilla_devices", {{"state", state}}, static_cast<double>(n));
    p.family("flotilla_devices_presence", "gauge", "Enrolled (not decommissioned) devices by broker presence.");
    p.sample("flotilla_devices_presence", {{"presence", "online"}}, static_cast<double>(online));
    p.sample("flotilla_devices_presence", {{"presence", "offline"}}, static_cast<double>(offline));
    p.family("flotilla_devices_k3s_cert_expiring", "gauge",
             "Devices whose k3s certificates expire within 30 days (or have expired), counted by UTC day as the "
             "dashboard does.");
    p.sample("flotilla_devices_k3s_cert_expiring", {}, static_cast<double>(certs_expiring));
    p.family("flotilla_devices_clock_suspect", "gauge", "Devices whose clock looked wrong in their last inventory.");
    p.sample("flotilla_devices_clock_suspect", {}, static_cast<double>(*suspect));
  } else {
    ++scrape_errors;
  }

  if (auto campaigns = s.list_campaigns(); campaigns) {
    std::map<std::string, int64_t> by_state;
    for (const auto& v : *campaigns) ++by_state[std::string(state_name(v.campaign.state))];
    p.family("flotilla_campaigns", "gauge", "Campaigns by state.");
    for (const auto& [state, n] : by_state) p.sample("flotilla_campaigns", {{"state", state}}, static_cast<double>(n));
    p.family("flotilla_campaign_devices", "gauge",
             "Devices of each campaign in flight (running, waiting for approval, converging, paused, rolling back) "
             "by campaign status; status=\"offline\" counts unfinished devices that are offline now.");
    for (const auto& v : *campaigns) {
      // Only campaigns in flight: finished ones (completed, aborted, rolled
      // back) would otherwise add eleven series each, forever.
      if (!campaign_active(v.campaign.state)) continue;
      const auto& c = v.counts;
      const std::pair<const char*, int64_t> rows[] = {
          {"waiting", c.waiting},       {"pending", c.pending},         {"in_progress", c.in_progress},
          {"applied", c.applied},       {"failed", c.failed},           {"superseded", c.superseded},
          {"skipped", c.skipped},       {"rolling_back", c.rolling_back}, {"rolled_back", c.rolled_back},
          {"rollback_failed", c.rollback_failed}, {"offline", c.offline}};
      for (const auto& [status, n] : rows) {
        p.sample("flotilla_campaign_devices", {{"campaign", v.campaign.id}, {"status", status}},
                 static_cast<double>(n));
      }
    }
  } else {
    ++scrape_errors;
  }

  const auto m = s.mqtt_counters();
  p.family("flotilla_mqtt_messages_received_total", "counter", "MQTT messages received from devices, by topic leaf.");
  p.sample("flotilla_mqtt_messages_received_total", {{"kind", "report"}}, static_cast<double>(m.reports_received));
  p.sample("flotilla_mqtt_messages_received_total", {{"kind", "presence"}}, static_cast<double>(m.presence_received));
  p.sample("flotilla_mqtt_messages_received_total", {{"kind", "gateway_reports"}},
           static_cast<double>(m.gateway_batches_received));
  p.sample("flotilla_mqtt_messages_received_total", {{"kind", "other"}}, static_cast<double>(m.other_received));
  p.family("flotilla_mqtt_messages_processed_total", "counter",
           "Device messages folded into the store (duplicates and unknown devices excluded).");
  p.sample("flotilla_mqtt_messages_processed_total", {{"kind", "report"}}, static_cast<double>(m.reports_processed));
  p.sample("flotilla_mqtt_messages_processed_total", {{"kind", "presence"}}, static_cast<double>(m.presence_processed));
  p.family("flotilla_mqtt_desired_published_total", "counter", "Desired-state messages published, by result.");
  p.sample("flotilla_mqtt_desired_published_total", {{"result", "ok"}}, static_cast<double>(m.desired_published));
  p.sample("flotilla_mqtt_desired_published_total", {{"result", "error"}},
           static_cast<double>(m.desired_publish_failures));
  p.family("flotilla_mqtt_messages_dropped_total", "counter",
           "Device messages dropped before queueing: larger than any legitimate one, or from a decommissioned device.");
  p.sample("flotilla_mqtt_messages_dropped_total", {{"reason", "too_large"}}, static_cast<double>(m.dropped_too_large));
  p.sample("flotilla_mqtt_messages_dropped_total", {{"reason", "decommissioned"}},
           static_cast<double>(m.dropped_decommissioned));
  p.family("flotilla_device_certificates_issued_total", "counter",
           "Broker client certificates the device CA issued, at enrollment or renewal.");
  p.sample("flotilla_device_certificates_issued_total", {{"at", "enroll"}},
           static_cast<double>(m.certificates_issued - m.renewals));
  p.sample("flotilla_device_certificates_issued_total", {{"at", "renew"}}, static_cast<double>(m.renewals));
  p.family("flotilla_broker_reloads_total", "counter",
           "Reload signals (SIGHUP) the hub sent the embedded broker: a decommission or a revocation-list refresh "
           "with certificates, every enrollment with passwords.");
  p.sample("flotilla_broker_reloads_total", {}, static_cast<double>(m.broker_reloads));
  p.family("flotilla_broker_restarts_total", "counter",
           "Times the hub found its embedded broker dead and started it again.");
  // Per cell (label cell): a cell's broker restarts, presence resets and
  // roll calls concern only that cell's devices.
  for (int i = 0; i < s.cell_count(); ++i) {
    const EmbeddedBroker* b = s.cell(i).broker();
    p.sample("flotilla_broker_restarts_total", {{"cell", std::to_string(i)}},
             static_cast<double>(b ? b->restarts() : 0));
  }
  p.family("flotilla_presence_resets_total", "counter",
           "Times the hub stopped trusting the presence it had (its broker session ended or began again: a broker "
           "restart, a lost connection, a hub start) and marked every device offline until it re-announces.");
  for (int i = 0; i < s.cell_count(); ++i) {
    p.sample("flotilla_presence_resets_total", {{"cell", std::to_string(i)}},
             static_cast<double>(s.cell(i).presence_resets.load()));
  }
  p.family("flotilla_presence_reset_devices_total", "counter",
           "Devices the hub marked offline because their cell's broker session ended (a dead broker sends no last "
           "wills) or began again; each is online again once it re-announces.");
  for (int i = 0; i < s.cell_count(); ++i) {
    p.sample("flotilla_presence_reset_devices_total", {{"cell", std::to_string(i)}},
             static_cast<double>(s.cell(i).presence_reset_devices.load()));
  }
  p.family("flotilla_rollcalls_published_total", "counter",
           "Roll calls (flotilla/v1/rollcall) the hub published asking every connected device to re-announce.");
  for (int i = 0; i < s.cell_count(); ++i) {
    p.sample("flotilla_rollcalls_published_total", {{"cell", std::to_string(i)}},
             static_cast<double>(s.cell(i).rollcalls.load()));
  }
  p.family("flotilla_cell_draining", "gauge", "1 while the cell is draining (no new enrollments; its devices move).");
  for (int i = 0; i < s.cell_count(); ++i) {
    p.sample("flotilla_cell_draining", {{"cell", std::to_string(i)}}, s.cell(i).draining() ? 1 : 0);
  }
  p.family("flotilla_campaign_leader", "gauge",
           "1 on the hub process that decides every campaign's thresholds and waves from the cells' summed counts.");
  p.sample("flotilla_campaign_leader", {}, s.campaign_leader() ? 1 : 0);
  p.family("flotilla_cell_owned", "gauge", "1 for each cell this hub process owns (claimed on the coordinator).");
  {
    const auto owned = s.owned_cells();
    for (int i = 0; i < s.cell_count(); ++i) {
      p.sample("flotilla_cell_owned", {{"cell", std::to_string(i)}},
               std::find(owned.begin(), owned.end(), i) != owned.end() ? 1 : 0);
    }
  }
  p.family("flotilla_cell_devices_moved_total", "counter",
           "Device rows moved between cells by a drain, when the device spoke from its new cell's broker.");
  for (int i = 0; i < s.cell_count(); ++i) {
    p.sample("flotilla_cell_devices_moved_total", {{"cell", std::to_string(i)}, {"direction", "in"}},
             static_cast<double>(s.cell(i).moved_in.load()));
    p.sample("flotilla_cell_devices_moved_total", {{"cell", std::to_string(i)}, {"direction", "out"}},
             static_cast<double>(s.cell(i).moved_out.load()));
  }
  p.family("flotilla_cell_move_requests_total", "counter",
           "Signed requests sent on a cell's broker by a drain: kind=move asks a device to move to another cell "
           "(each retry counts), kind=withdrawal tells it to stay after the drain stopped.");
  for (int i = 0; i < s.cell_count(); ++i) {
    p.sample("flotilla_cell_move_requests_total", {{"cell", std::to_string(i)}, {"kind", "move"}},
             static_cast<double>(s.cell(i).moves_asked.load()));
    p.sample("flotilla_cell_move_requests_total", {{"cell", std::to_string(i)}, {"kind", "withdrawal"}},
             static_cast<double>(s.cell(i).moves_withdrawn.load()));
  }
  p.family("flotilla_cell_desired_published_total", "counter", "Desired-state messages published, by cell.");
  for (int i = 0; i < s.cell_count(); ++i) {
    p.sample("flotilla_cell_desired_published_total", {{"cell", std::to_string(i)}},
             static_cast<double>(s.cell(i).desired_published.load()));
  }
  p.family("flotilla_presence_stale_ignored_total", "counter",
           "Retained 'online' presence messages ignored: a retained message proves only that the device was once "
           "online, not that it is now.");
  p.sample("flotilla_presence_stale_ignored_total", {}, static_cast<double>(m.stale_presence_ignored));
  p.family("flotilla_log_lines_suppressed_total", "counter",
           "Log lines about device messages not written because one device (or gateway) caused too many.");
  p.sample("flotilla_log_lines_suppressed_total", {}, static_cast<double>(m.log_lines_suppressed));
  p.family("flotilla_mqtt_connected", "gauge", "1 while the hub is subscribed to device reports.");
  p.sample("flotilla_mqtt_connected", {}, s.mqtt_connected() ? 1 : 0);
  if (const ControlLog* control = s.control_log()) {  // several hubs on etcd (docs/adr/0016)
    const auto c = control->counters();
    p.family("flotilla_control_log_revision", "gauge",
             "The coordinator revision of the last control-log entry this hub's store has applied.");
    p.sample("flotilla_control_log_revision", {}, static_cast<double>(control->applied_revision()));
    p.family("flotilla_control_log_stuck", "gauge",
             "1 while this hub's mirror cannot apply the next control-log entry (the reason is in the log).");
    p.sample("flotilla_control_log_stuck", {}, control->stuck_reason().empty() ? 0 : 1);
    p.family("flotilla_control_log_entries_applied_total", "counter", "Control-log entries of other hubs applied here.");
    p.sample("flotilla_control_log_entries_applied_total", {}, static_cast<double>(c.entries_applied));
    p.family("flotilla_control_writes_total", "counter", "Control writes this hub appended to the control log.");
    p.sample("flotilla_control_writes_total", {}, static_cast<double>(c.writes));
    p.family("flotilla_control_write_retries_total", "counter",
             "Control writes run again because another hub appended to the log first.");
    p.sample("flotilla_control_write_retries_total", {}, static_cast<double>(c.retries));
    p.family("flotilla_control_writes_refused_total", "counter",
             "Control writes refused, nothing written: coordinator unreachable (503), still losing the race after "
             "every retry (409), too large for one log entry (413), this hub's mirror stuck (503), or a campaign "
             "leader's decision made after another hub took the leadership over (deposed).");
    p.sample("flotilla_control_writes_refused_total", {{"reason", "unavailable"}},
             static_cast<double>(c.refused_unavailable));
    p.sample("flotilla_control_writes_refused_total", {{"reason", "conflict"}}, static_cast<double>(c.refused_conflict));
    p.sample("flotilla_control_writes_refused_total", {{"reason", "too_large"}},
             static_cast<double>(c.refused_too_large));
    p.sample("flotilla_control_writes_refused_total", {{"reason", "stuck"}}, static_cast<double>(c.refused_stuck));
    p.sample("flotilla_control_writes_refused_total", {{"reason", "deposed"}}, static_cast<double>(c.refused_guard));
    p.family("flotilla_control_log_snapshots_total", "counter",
             "Snapshots of the control tables this hub wrote to the coordinator, or loaded from it because "
             "entries it needed had been trimmed or compacted away (docs/adr/0016).");
    p.sample("flotilla_control_log_snapshots_total", {{"op", "written"}}, static_cast<double>(c.snapshots_written));
    p.sample("flotilla_control_log_snapshots_total", {{"op", "loaded"}}, static_cast<double>(c.snapshots_loaded));
    p.family("flotilla_control_log_entries_trimmed_total", "counter",
             "Control-log entries this hub deleted from the coordinator behind a snapshot.");
    p.sample("flotilla_control_log_entries_trimmed_total", {}, static_cast<double>(c.entries_trimmed));
  }

  p.family("flotilla_report_queue_depth", "gauge", "Device messages received and not yet processed.");
  p.sample("flotilla_report_queue_depth", {}, static_cast<double>(s.queue_depth()));
  p.family("flotilla_report_queue_capacity", "gauge", "Queue size at which the hub stops reading from the broker.");
  p.sample("flotilla_report_queue_capacity", {}, static_cast<double>(s.queue_capacity()));

  const auto h = s.report_commit_seconds().snapshot();
  const std::string hn = "flotilla_store_report_commit_seconds";
  p.family(hn, "histogram", "Time to process and commit one batch of device messages in SQLite.");
  for (size_t i = 0; i < h.bounds.size(); ++i) p.sample(hn + "_bucket", {{"le", num(h.bounds[i])}}, h.cumulative[i]);
  p.sample(hn + "_bucket", {{"le", "+Inf"}}, static_cast<double>(h.count));
  p.sample(hn + "_sum", {}, h.sum);
  p.sample(hn + "_count", {}, static_cast<double>(h.count));

  p.family("flotilla_http_requests_total", "counter", "REST requests by method, route pattern and status code.");
  for (const auto& [key, n] : http.snapshot()) {
    const auto& [method, route, code] = key;
    p.sample("flotilla_http_requests_total", {{"method", method}, {"route", route}, {"code", code}},
             static_cast<double>(n));
  }
  p.family("flotilla_rate_limited_total", "counter", "Requests refused by a rate limit (429), by limit.");
  for (const char* limit : {"enroll", "enroll_token"}) {
    const auto all = http.rate_limited();
    auto it = all.find(limit);
    p.sample("flotilla_rate_limited_total", {{"limit", limit}}, static_cast<double>(it == all.end() ? 0 : it->second));
  }
  if (const ServerStats* st = http.server_stats()) {
    p.family("flotilla_http_connections", "gauge", "Open REST API connections.");
    p.sample("flotilla_http_connections", {}, static_cast<double>(st->connections.load()));
    p.family("flotilla_http_connections_refused_total", "counter",
             "Connections closed at once because their peer address had too many open.");
    p.sample("flotilla_http_connections_refused_total", {{"reason", "per_peer"}},
             static_cast<double>(st->refused_per_peer.load()));
    p.family("flotilla_http_accept_paused_total", "counter",
             "Times the server stopped accepting because it held http-max-connections.");
    p.sample("flotilla_http_accept_paused_total", {}, static_cast<double>(st->accept_paused.load()));
    p.family("flotilla_http_accept_errors_total", "counter",
             "Failed accepts (out of file descriptors, say); each is followed by a pause, not a retry loop.");
    p.sample("flotilla_http_accept_errors_total", {}, static_cast<double>(st->accept_errors.load()));
  }
  p.family("flotilla_audit_write_failures_total", "counter", "Mutating calls whose audit row could not be written.");
  p.sample("flotilla_audit_write_failures_total", {}, static_cast<double>(http.audit_failures()));
  // The standard process metrics of Prometheus's client libraries, from /proc/self.
  const ProcessStats ps = read_process_stats();
  p.family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.");
  p.sample("process_cpu_seconds_total", {}, ps.cpu_seconds);
  p.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
  p.sample("process_resident_memory_bytes", {}, ps.resident_memory_bytes);
  p.family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.");
  p.sample("process_virtual_memory_bytes", {}, ps.virtual_memory_bytes);
  p.family("process_open_fds", "gauge", "Number of open file descriptors.");
  p.sample("process_open_fds", {}, ps.open_fds);
  if (ps.max_fds >= 0) {
    p.family("process_max_fds", "gauge", "Maximum number of open file descriptors.");
    p.sample("process_max_fds", {}, ps.max_fds);
  }
  p.family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.");
  p.sample("process_start_time_seconds", {}, ps.start_time_seconds);
  p.family("flotilla_scrape_errors", "gauge", "Store reads that failed while rendering this page.");
  p.sample("flotilla_scrape_errors", {}, scrape_errors);
  return p.str();
}

}  // namespace flotilla::hub
