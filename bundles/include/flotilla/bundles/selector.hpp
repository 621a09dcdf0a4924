#pragma once
// Kubernetes-style label selectors (campaign targeting on the hub, overlays on the agent): "env=prod,tier!=db,region in (eu,us),gpu,!legacy".
#include <map>
#include <string>
#include <vector>

#include "flotilla/common/result.hpp"

namespace flotilla::bundles {

using Labels = std::map<std::string, std::string>;

class Selector {
 public:
  enum class Op { equals, not_equals, in, not_in, exists, not_exists };
  struct Requirement {
    std::string key;
    Op op;
    std::vector<std::string> values;
  };

  // An empty selector matches every device.
  static Result<Selector> parse(const std::string& text);
  bool matches(const Labels& labels) const;
  const std::string& text() const { return text_; }
  const std::vector<Requirement>& requirements() const { return reqs_; }

 private:
  std::string text_;
  std::vector<Requirement> reqs_;
};

bool valid_label_key(const std::string& k);
bool valid_label_value(const std::string& v);

}  // namespace flotilla::bundles
