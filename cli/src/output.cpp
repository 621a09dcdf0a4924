#include "output.hpp"

#include <yaml-cpp/yaml.h>

#include <iostream>
#include <regex>

namespace flotilla::cli {

using nlohmann::json;

Status check_output(const Options& o) {
  if (!o.has("o")) return {};
  const std::string& v = o.get("o");
  if (v == "table" || v == "wide" || v == "json" || v == "yaml") return {};
  return make_error(Errc::invalid_argument,
                    "-o: unknown output format '" + v + "' (allowed: table, wide, json, yaml)");
}

bool print_structured(const Options& o, const json& j, std::ostream& out) {
  if (!o.has("o")) return false;
  if (o.get("o") == "json") {
    out << j.dump(2) << "\n";
    return true;
  }
  if (o.get("o") == "yaml") {
    out << to_yaml(j);
    return true;
  }
  return false;
}

bool print_structured(const Options& o, const json& j) { return print_structured(o, j, std::cout); }

bool wide(const Options& o) { return o.has("o") && o.get("o") == "wide"; }

namespace {

bool needs_quotes(const std::string& s) {
  static const std::regex plain_special(
      "|~|null|Null|NULL|true|True|TRUE|false|False|FALSE|yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF|"
      "[-+]?[0-9][0-9_]*|[-+]?(\\.[0-9]+|[0-9]+(\\.[0-9]*)?)([eE][-+]?[0-9]+)?|0x[0-9a-fA-F]+|0o[0-7]+|"
      "[-+]?\\.(inf|Inf|INF)|\\.(nan|NaN|NAN)");
  return std::regex_match(s, plain_special);
}

void emit(YAML::Emitter& e, const json& j) {
  switch (j.type()) {
    case json::value_t::object:
      if (j.empty()) {
        e << YAML::Flow << YAML::BeginMap << YAML::EndMap;
        return;
      }
      e << YAML::BeginMap;
      for (const auto& [k, v] : j.items()) {
        e << YAML::Key;
        if (needs_quotes(k)) e << YAML::DoubleQuoted;
        e << k << YAML::Value;
        emit(e, v);
      }
      e << YAML::EndMap;
      return;
    case json::value_t::array:
      if (j.empty()) {
        e << YAML::Flow << YAML::BeginSeq << YAML::EndSeq;
        return;
      }
      e << YAML::BeginSeq;
      for (const auto& v : j) emit(e, v);
      e << YAML::EndSeq;
      return;
    case json::value_t::string: {
      const auto& s = j.get_ref<const std::string&>();
      if (s.find('\n') != std::string::npos) e << YAML::Literal << s;
      else if (needs_quotes(s)) e << YAML::DoubleQuoted << s;
      else e << s;
      return;
    }
    case json::value_t::boolean: e << (j.get<bool>() ? "true" : "false"); return;
    case json::value_t::number_integer: e << j.get<int64_t>(); return;
    case json::value_t::number_unsigned: e << j.get<uint64_t>(); return;
    case json::value_t::number_float: e << j.dump(); return;
    default: e << YAML::Null; return;
  }
}

}  // namespace

std::string to_yaml(const json& j) {
  YAML::Emitter e;
  e.SetIndent(2);
  emit(e, j);
  std::string out = e.c_str();
  if (out.empty() || out.back() != '\n') out += "\n";
  return out;
}

void Table::print(std::ostream& out) const {
  std::vector<size_t> width(header_.size(), 0);
  auto measure = [&](const std::vector<std::string>& row) {
    for (size_t i = 0; i < row.size() && i < width.size(); ++i) width[i] = std::max(width[i], row[i].size());
  };
  measure(header_);
  for (const auto& r : rows_) measure(r);
  auto line = [&](const std::vector<std::string>& row) {
    std::string s;
    for (size_t i = 0; i < header_.size(); ++i) {
      const std::string cell = i < row.size() ? row[i] : "";
      s += cell;
      if (i + 1 < header_.size()) s += std::string(width[i] - cell.size() + 3, ' ');
    }
    while (!s.empty() && s.back() == ' ') s.pop_back();
    out << s << "\n";
  };
  line(header_);
  for (const auto& r : rows_) line(r);
}

}  // namespace flotilla::cli
