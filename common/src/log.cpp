#include "flotilla/common/log.hpp"

#include <time.h>

#include <chrono>
#include <cstdio>
#include <mutex>

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_color_sinks.h>

namespace flotilla::log {
namespace {
std::mutex g_mu;
spdlog::level::level_enum g_level = spdlog::level::info;
bool g_json = false;

// UTC, RFC 3339 with milliseconds, in both formats: log lines from devices
// in many time zones line up.
constexpr const char* kTextPattern = "%Y-%m-%dT%H:%M:%S.%eZ %^%l%$ %n %v";

void append(spdlog::memory_buf_t& dest, std::string_view s) { dest.append(s.data(), s.data() + s.size()); }

// The length of the valid UTF-8 sequence at s[i], or 0 if there is none
// (bytes from the network can be anything; a JSON line must stay parseable).
size_t utf8_sequence(std::string_view s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  if (n == 2 && c < 0xC2) return 0;  // overlong
  for (size_t k = 1; k < n; ++k) {
    if ((static_cast<unsigned char>(s[i + k]) >> 6) != 0x2) return 0;
  }
  const auto c1 = static_cast<unsigned char>(s[i + 1 < s.size() ? i + 1 : i]);
  if (n == 3 && ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 >= 0xA0))) return 0;  // overlong, surrogates
  if (n == 4 && ((c == 0xF0 && c1 < 0x90) || c > 0xF4 || (c == 0xF4 && c1 >= 0x90))) return 0;
  return n;
}

void append_json_string(spdlog::memory_buf_t& dest, std::string_view s) {
  dest.push_back('"');
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      dest.push_back('\\');
      dest.push_back(char(c));
      ++i;
    } else if (c == '\n') {
      append(dest, "\\n");
      ++i;
    } else if (c < 0x20 || c == 0x7F) {
      char esc[8];
      std::snprintf(esc, sizeof esc, "\\u%04x", c);
      append(dest, esc);
      ++i;
    } else {
      const size_t n = utf8_sequence(s, i);
      if (n == 0) {
        append(dest, "\\ufffd");
        ++i;
      } else {
        append(dest, s.substr(i, n));
        i += n;
      }
    }
  }
  dest.push_back('"');
}

// One JSON object per line: {"time":"<RFC 3339 UTC>","level":..,"logger":..,"msg":..}.
class JsonFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    using namespace std::chrono;
    const auto since = msg.time.time_since_epoch();
    const time_t secs = duration_cast<seconds>(since).count();
    const auto ms = duration_cast<milliseconds>(since).count() % 1000;
    std::tm tm{};
    ::gmtime_r(&secs, &tm);
    char ts[64];  // room for any int the compiler can imagine in each field
    std::snprintf(ts, sizeof ts, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                  tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, int(ms));
    append(dest, "{\"time\":\"");
    append(dest, ts);
    append(dest, "\",\"level\":");
    const auto level = spdlog::level::to_string_view(msg.level);
    append_json_string(dest, std::string_view(level.data(), level.size()));
    append(dest, ",\"logger\":");
    append_json_string(dest, std::string_view(msg.logger_name.data(), msg.logger_name.size()));
    append(dest, ",\"msg\":");
    append_json_string(dest, std::string_view(msg.payload.data(), msg.payload.size()));
    append(dest, "}\n");
  }
  std::unique_ptr<spdlog::formatter> clone() const override { return std::make_unique<JsonFormatter>(); }
};

std::unique_ptr<spdlog::formatter> make_formatter() {
  if (g_json) return std::make_unique<JsonFormatter>();
  return std::make_unique<spdlog::pattern_formatter>(kTextPattern, spdlog::pattern_time_type::utc);
}

void apply(spdlog::logger& l) {
  l.set_level(g_level);
  l.set_formatter(make_formatter());
}
}  // namespace

bool valid_level(const std::string& level) {
  for (const char* l : {"trace", "debug", "info", "warn", "warning", "error", "critical", "off"}) {
    if (level == l) return true;
  }
  return false;
}

bool valid_format(const std::string& format) { return format == "text" || format == "json"; }

bool setup(const std::string& level, const std::string& format) {
  std::lock_guard lock(g_mu);
  // spdlog maps unknown names to "off": refuse them instead of going silent.
  const bool known = valid_level(level) && valid_format(format);
  g_level = valid_level(level) ? spdlog::level::from_str(level == "warning" ? "warn" : level) : spdlog::level::info;
  g_json = format == "json";
  spdlog::set_level(g_level);
  spdlog::set_formatter(make_formatter());
  spdlog::apply_all([](const std::shared_ptr<spdlog::logger>& l) { apply(*l); });
  return known;
}

std::shared_ptr<spdlog::logger> get(const std::string& module) {
  std::lock_guard lock(g_mu);
  if (auto existing = spdlog::get(module)) return existing;
  auto logger = spdlog::stderr_color_mt(module);
  apply(*logger);
  return logger;
}

}  // namespace flotilla::log
