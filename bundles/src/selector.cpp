#include "flotilla/bundles/selector.hpp"

#include <algorithm>
#include <cctype>

namespace flotilla::bundles {

namespace {
bool label_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.' || c == '/'; }

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

Error bad(const std::string& text, const std::string& why) {
  return make_error(Errc::invalid_argument, "selector '" + text + "': " + why);
}
}  // namespace

bool valid_label_key(const std::string& k) {
  return !k.empty() && k.size() <= 253 && std::all_of(k.begin(), k.end(), label_char) &&
         std::isalnum(static_cast<unsigned char>(k.front()));
}
bool valid_label_value(const std::string& v) {
  return v.size() <= 63 && std::all_of(v.begin(), v.end(), [](char c) { return label_char(c) && c != '/'; });
}

Result<Selector> Selector::parse(const std::string& text) {
  Selector s;
  s.text_ = trim(text);
  // Split on commas outside parentheses.
  std::vector<std::string> parts;
  std::string cur;
  int depth = 0;
  for (char c : s.text_) {
    if (c == '(') ++depth;
    if (c == ')') --depth;
    if (depth < 0) return bad(text, "unbalanced ')'");
    if (c == ',' && depth == 0) {
      parts.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  if (depth != 0) return bad(text, "unbalanced '('");
  if (!trim(cur).empty() || !parts.empty()) parts.push_back(cur);
  for (auto& raw : parts) {
    std::string p = trim(raw);
    if (p.empty()) return bad(text, "empty requirement");
    Requirement r;
    auto set_values = [&](size_t open) -> Status {
      auto close = p.rfind(')');
      if (open == std::string::npos || close == std::string::npos || close < open || trim(p.substr(close + 1)) != "") {
        return bad(text, "'" + p + "': expected a list like (a,b)");
      }
      std::string inner = p.substr(open + 1, close - open - 1);
      size_t start = 0;
      for (;;) {
        auto comma = inner.find(',', start);
        std::string v = trim(inner.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
        if (!valid_label_value(v)) return bad(text, "bad value '" + v + "'");
        r.values.push_back(v);
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
      return {};
    };
    size_t sp;
    if (p[0] == '!') {
      r.key = trim(p.substr(1));
      r.op = Op::not_exists;
    } else if ((sp = p.find(" notin ")) != std::string::npos) {
      r.key = trim(p.substr(0, sp));
      r.op = Op::not_in;
      if (auto st = set_values(p.find('(', sp)); !st) return st.error();
    } else if ((sp = p.find(" in ")) != std::string::npos) {
      r.key = trim(p.substr(0, sp));
      r.op = Op::in;
      if (auto st = set_values(p.find('(', sp)); !st) return st.error();
    } else if ((sp = p.find("!=")) != std::string::npos) {
      r.key = trim(p.substr(0, sp));
      r.op = Op::not_equals;
      r.values.push_back(trim(p.substr(sp + 2)));
    } else if ((sp = p.find("==")) != std::string::npos) {
      r.key = trim(p.substr(0, sp));
      r.op = Op::equals;
      r.values.push_back(trim(p.substr(sp + 2)));
    } else if ((sp = p.find('=')) != std::string::npos) {
      r.key = trim(p.substr(0, sp));
      r.op = Op::equals;
      r.values.push_back(trim(p.substr(sp + 1)));
    } else {
      r.key = p;
      r.op = Op::exists;
    }
    if (!valid_label_key(r.key)) return bad(text, "bad label key '" + r.key + "'");
    for (const auto& v : r.values) {
      if (!valid_label_value(v)) return bad(text, "bad label value '" + v + "'");
    }
    s.reqs_.push_back(std::move(r));
  }
  return s;
}

bool Selector::matches(const Labels& labels) const {
  for (const auto& r : reqs_) {
    auto it = labels.find(r.key);
    const bool has = it != labels.end();
    switch (r.op) {
      case Op::equals: if (!has || it->second != r.values[0]) return false; break;
      case Op::not_equals: if (has && it->second == r.values[0]) return false; break;
      case Op::in:
        if (!has || std::find(r.values.begin(), r.values.end(), it->second) == r.values.end()) return false;
        break;
      case Op::not_in:
        if (has && std::find(r.values.begin(), r.values.end(), it->second) != r.values.end()) return false;
        break;
      case Op::exists: if (!has) return false; break;
      case Op::not_exists: if (has) return false; break;
    }
  }
  return true;
}

}  // namespace flotilla::bundles
