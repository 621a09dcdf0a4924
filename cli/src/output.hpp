#pragma once
// Output of every command that prints objects: -o table (the default), wide
// (more columns), json or yaml. An unknown -o is refused before anything runs.
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

#include "flotilla/common/options.hpp"
#include "flotilla/common/result.hpp"

namespace flotilla::cli {

inline constexpr const char* kOutputHelp = "output: table, wide, json or yaml";

// Checks -o when the command has it; the error names the allowed values.
Status check_output(const Options& o);
// -o json or yaml: prints j that way and returns true; table/wide: false.
bool print_structured(const Options& o, const nlohmann::json& j, std::ostream& out);
bool print_structured(const Options& o, const nlohmann::json& j);
bool wide(const Options& o);
// JSON as block-style YAML; strings that YAML would read as something else
// (true, 12, null, "") are quoted, so the output reads back as it was.
std::string to_yaml(const nlohmann::json& j);

// Columns as wide as their widest cell, three spaces apart (kubectl's look).
class Table {
 public:
  explicit Table(std::vector<std::string> header) : header_(std::move(header)) {}
  void add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  void print(std::ostream& out) const;
  bool empty() const { return rows_.empty(); }

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

}  // namespace flotilla::cli
