// The report as one self-contained HTML page: inline SVG line plots, no
// scripts, no external files, so it can be attached to an issue or opened
// from a CI artifact as is.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "flotilla/sim/fleet.hpp"

namespace flotilla::sim {

using nlohmann::json;

namespace {

struct Series {
  std::string name;
  std::vector<std::pair<double, double>> points;
};

std::string esc(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string num(double v) {
  char buf[64];
  if (std::fabs(v) >= 1e9) std::snprintf(buf, sizeof buf, "%.2fG", v / 1e9);
  else if (std::fabs(v) >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", v / 1e6);
  else if (std::fabs(v) >= 1e4) std::snprintf(buf, sizeof buf, "%.1fk", v / 1e3);
  else if (std::fabs(v - std::round(v)) < 1e-9) std::snprintf(buf, sizeof buf, "%.0f", v);
  else std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

const char* kColors[] = {"#1f77b4", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd",
                         "#8c564b", "#e377c2", "#7f7f7f", "#17becf", "#bcbd22"};

// A line plot; marks are vertical lines with labels (p50/p99/p99.9).
std::string plot(const std::string& title, const std::string& xlabel, const std::string& ylabel,
                 const std::vector<Series>& series, const std::vector<std::pair<std::string, double>>& marks = {}) {
  const double W = 720, H = 300, L = 70, R = 160, T = 30, B = 45;
  double xmax = 0, ymax = 0;
  for (const auto& s : series) {
    for (const auto& [x, y] : s.points) {
      xmax = std::max(xmax, x);
      ymax = std::max(ymax, y);
    }
  }
  for (const auto& [n, x] : marks) xmax = std::max(xmax, x);
  if (xmax <= 0) xmax = 1;
  if (ymax <= 0) ymax = 1;
  ymax *= 1.05;
  auto X = [&](double x) { return L + (W - L - R) * x / xmax; };
  auto Y = [&](double y) { return H - B - (H - T - B) * y / ymax; };
  std::string svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"plot\" width=\"" + num(W) + "\" height=\"" +
                    num(H) + "\" viewBox=\"0 0 " + num(W) + " " + num(H) + "\">\n";
  svg += "<title>" + esc(title) + "</title>\n";
  svg += "<text x=\"" + num(L) + "\" y=\"18\" font-weight=\"bold\">" + esc(title) + "</text>\n";
  svg += "<rect x=\"" + num(L) + "\" y=\"" + num(T) + "\" width=\"" + num(W - L - R) + "\" height=\"" +
         num(H - T - B) + "\" fill=\"none\" stroke=\"#999\"/>\n";
  for (int i = 0; i <= 4; ++i) {
    const double yv = ymax * i / 4, xv = xmax * i / 4;
    svg += "<text x=\"" + num(L - 6) + "\" y=\"" + num(Y(yv) + 4) + "\" text-anchor=\"end\" font-size=\"11\">" +
           num(yv) + "</text>\n";
    svg += "<text x=\"" + num(X(xv)) + "\" y=\"" + num(H - B + 16) + "\" text-anchor=\"middle\" font-size=\"11\">" +
           num(xv) + "</text>\n";
    svg += "<line x1=\"" + num(L) + "\" x2=\"" + num(W - R) + "\" y1=\"" + num(Y(yv)) + "\" y2=\"" + num(Y(yv)) +
           "\" stroke=\"#eee\"/>\n";
  }
  svg += "<text x=\"" + num((L + W - R) / 2) + "\" y=\"" + num(H - 8) + "\" text-anchor=\"middle\" font-size=\"12\">" +
         esc(xlabel) + "</text>\n";
  svg += "<text x=\"14\" y=\"" + num((T + H - B) / 2) + "\" font-size=\"12\" transform=\"rotate(-90 14 " +
         num((T + H - B) / 2) + ")\" text-anchor=\"middle\">" + esc(ylabel) + "</text>\n";
  for (size_t i = 0; i < series.size(); ++i) {
    const auto& s = series[i];
    const char* color = kColors[i % 10];
    if (!s.points.empty()) {
      std::string pts;
      for (const auto& [x, y] : s.points) pts += num(X(x)) + "," + num(Y(y)) + " ";
      svg += "<polyline class=\"series\" data-name=\"" + esc(s.name) + "\" fill=\"none\" stroke=\"" + color +
             "\" stroke-width=\"2\" points=\"" + pts + "\"/>\n";
    }
    const double ly = T + 14 + 16 * static_cast<double>(i);
    svg += "<rect x=\"" + num(W - R + 10) + "\" y=\"" + num(ly - 9) + "\" width=\"10\" height=\"10\" fill=\"" + color +
           "\"/><text x=\"" + num(W - R + 25) + "\" y=\"" + num(ly) + "\" font-size=\"12\">" + esc(s.name) +
           "</text>\n";
  }
  for (const auto& [name, x] : marks) {
    svg += "<line class=\"mark\" x1=\"" + num(X(x)) + "\" x2=\"" + num(X(x)) + "\" y1=\"" + num(T) + "\" y2=\"" +
           num(H - B) + "\" stroke=\"#d62728\" stroke-dasharray=\"4 3\"/><text x=\"" + num(X(x) + 3) + "\" y=\"" +
           num(T + 12) + "\" font-size=\"11\" fill=\"#d62728\">" + esc(name) + "</text>\n";
  }
  svg += "</svg>\n";
  return svg;
}

double t_s(const json& s) { return s.value("t_ms", 0.0) / 1000.0; }

}  // namespace

std::string render_html(const json& report) {
  const json& tl = report.value("timeline", json::array());
  const json& fig = report.value("figures", json::object());
  const json& cfg = report.value("config", json::object());

  // Devices by state (the simulator's view) and the hub's campaign counts.
  std::vector<Series> states;
  if (!tl.empty()) {
    for (const auto& [name, v] : tl.back()["devices"].items()) {
      Series s{name, {}};
      bool any = false;
      for (const auto& p : tl) {
        const double y = p["devices"].value(name, 0.0);
        any = any || y > 0;
        s.points.emplace_back(t_s(p), y);
      }
      if (any) states.push_back(std::move(s));
    }
  }
  std::vector<Series> hub_counts;
  for (const char* k : {"pending", "in_progress", "applied", "failed", "rolled_back", "offline"}) {
    Series s{k, {}};
    bool any = false;
    for (const auto& p : tl) {
      if (!p.contains("hub_counts")) continue;
      const double y = p["hub_counts"].value(k, 0.0);
      any = any || y > 0;
      s.points.emplace_back(t_s(p), y);
    }
    if (any) hub_counts.push_back(std::move(s));
  }
  Series cdf{"devices finished", {}};
  for (const auto& pt : report.value("latency_cdf", json::array())) {
    cdf.points.emplace_back(pt[0].get<double>() / 1000.0, pt[1].get<double>());
  }
  std::vector<std::pair<std::string, double>> marks;
  for (const auto& [label, key] : {std::pair{"p50", "latency_p50_ms"}, std::pair{"p99", "latency_p99_ms"},
                                   std::pair{"p99.9", "latency_p999_ms"}}) {
    if (fig.contains(key) && fig[key].is_number()) marks.emplace_back(label, fig[key].get<double>() / 1000.0);
  }
  Series rss{"hub RSS (MiB)", {}}, cpu{"hub CPU (cores)", {}}, sim_rss{"simulator RSS (MiB)", {}};
  Series rate{"messages/s (sim sent+received)", {}};
  for (size_t i = 0; i < tl.size(); ++i) {
    const auto& p = tl[i];
    if (p.contains("hub_rss_bytes")) rss.points.emplace_back(t_s(p), p["hub_rss_bytes"].get<double>() / (1 << 20));
    if (p.contains("sim_rss_bytes")) sim_rss.points.emplace_back(t_s(p), p["sim_rss_bytes"].get<double>() / (1 << 20));
    if (i > 0 && p.contains("hub_cpu_s") && tl[i - 1].contains("hub_cpu_s")) {
      const double dt = t_s(p) - t_s(tl[i - 1]);
      if (dt > 0) cpu.points.emplace_back(t_s(p), (p["hub_cpu_s"].get<double>() - tl[i - 1]["hub_cpu_s"].get<double>()) / dt);
    }
    if (p.contains("msgs_per_s")) rate.points.emplace_back(t_s(p), p["msgs_per_s"].get<double>());
  }

  std::string html =
      "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>flotilla-sim report</title>\n"
      "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
      "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
      "svg{display:block;margin:1em 0}</style></head><body>\n";
  html += "<h1>flotilla-sim: " + esc(cfg.value("mode", "")) + " mode, " + num(cfg.value("devices", 0.0)) +
          " devices</h1>\n";
  html += "<p>Campaign <code>" + esc(report["campaign"].value("id", "")) + "</code> ended <b>" +
          esc(report["campaign"].value("end_state", "")) + "</b>; seed " + esc(cfg.value("seed", json(0)).dump()) +
          ".</p>\n<h2>Figures</h2>\n<table id=\"figures\">\n";
  for (const auto& [k, v] : fig.items()) {
    html += "<tr><th>" + esc(k) + "</th><td>" + esc(v.is_number() ? num(v.get<double>()) : v.dump()) + "</td></tr>\n";
  }
  html += "</table>\n<h2>Plots</h2>\n";
  html += plot("Devices by state (simulator)", "seconds since the campaign was created", "devices", states);
  html += plot("Campaign counts (hub)", "seconds since the campaign was created", "devices", hub_counts);
  html += plot("Per-device latency CDF", "seconds from campaign creation to the final report", "fraction of devices",
               {cdf}, marks);
  html += plot("Hub memory", "seconds", "MiB", {rss, sim_rss});
  html += plot("Hub CPU", "seconds", "cores", {cpu});
  html += plot("Messages per second", "seconds", "messages/s", {rate});
  html += "<h2>Configuration</h2>\n<pre>" + esc(cfg.dump(2)) + "</pre>\n</body></html>\n";
  return html;
}

}  // namespace flotilla::sim
