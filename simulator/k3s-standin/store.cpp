// The stand-in's datastore (what k3s keeps in kine/SQLite or embedded etcd:
// nodes and the objects auto-deployed manifests created) and the small
// manifest reader its deploy controller uses.
#include <algorithm>
#include <cctype>
#include <filesystem>
#include <sstream>
#include <stdexcept>

#include "standin.hpp"

namespace flotilla::standin {

namespace fs = std::filesystem;

namespace {
constexpr std::string_view kHeader = "k3s-standin-datastore 1";

bool plain_token(const std::string& s) {
  if (s.empty() || s.size() > 253) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_' || c == '/' ||
           c == '+' || c == ':';
  });
}
}  // namespace

std::string datastore_path(const std::string& data_dir, bool etcd) {
  // k3s: kine's SQLite at server/db/state.db; embedded etcd under server/db/etcd.
  return etcd ? (fs::path(data_dir) / "server/db/etcd/member/standin.db").string()
              : (fs::path(data_dir) / "server/db/state.db").string();
}

Datastore load_datastore(const std::string& path) {
  Datastore ds;
  const auto text = read_file(path);
  if (!text) return ds;  // a new cluster
  std::istringstream lines(*text);
  std::string line;
  if (!std::getline(lines, line) || line != kHeader) {
    throw std::runtime_error("datastore " + path + " is corrupt (bad header)");
  }
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    std::istringstream f(line);
    std::string type;
    f >> type;
    if (type == "node") {
      NodeRecord n;
      f >> n.name >> n.role >> n.ready >> n.heartbeat >> n.created >> n.kubelet_version;
      if (!f) throw std::runtime_error("datastore " + path + " is corrupt (node line)");
      ds.nodes[n.name] = n;
    } else if (type == "res") {
      Resource r;
      int never = 0;
      f >> r.kind >> r.api_version >> r.ns >> r.name >> r.addon >> r.replicas >> never >> r.generation;
      if (!f) throw std::runtime_error("datastore " + path + " is corrupt (resource line)");
      if (r.ns == "-") r.ns.clear();
      r.never_ready = never != 0;
      ds.resources[r.key()] = r;
    } else {
      throw std::runtime_error("datastore " + path + " is corrupt (unknown record '" + type + "')");
    }
  }
  return ds;
}

void save_datastore(const std::string& path, const Datastore& ds) {
  std::ostringstream out;
  out << kHeader << "\n";
  for (const auto& [name, n] : ds.nodes) {
    out << "node " << n.name << " " << n.role << " " << n.ready << " " << n.heartbeat << " " << n.created << " "
        << (n.kubelet_version.empty() ? "-" : n.kubelet_version) << "\n";
  }
  for (const auto& [key, r] : ds.resources) {
    out << "res " << r.kind << " " << r.api_version << " " << (r.ns.empty() ? "-" : r.ns) << " " << r.name << " "
        << r.addon << " " << r.replicas << " " << (r.never_ready ? 1 : 0) << " " << r.generation << "\n";
  }
  write_file_atomic(path, out.str(), 0600);
}

namespace {

int indent_of(const std::string& line) {
  int n = 0;
  while (n < static_cast<int>(line.size()) && line[static_cast<size_t>(n)] == ' ') ++n;
  return n;
}

std::string scalar(std::string v) {
  v = trim(v);
  if (const auto hash = v.find(" #"); hash != std::string::npos) v = trim(v.substr(0, hash));
  if (v.size() >= 2 && (v.front() == '"' || v.front() == '\'') && v.back() == v.front()) {
    v = v.substr(1, v.size() - 2);
  }
  return v;
}

}  // namespace

std::vector<Resource> parse_manifest(const std::string& text, const std::string& addon) {
  std::vector<Resource> out;
  std::istringstream lines(text);
  std::string line;
  Resource cur;
  cur.addon = addon;
  std::string top;      // the current top-level key
  std::string section;  // metadata.<section> or spec.<section>
  auto flush = [&] {
    if (plain_token(cur.kind) && plain_token(cur.name) && plain_token(cur.api_version) &&
        (cur.ns.empty() || plain_token(cur.ns))) {
      if (kind_info(cur.kind, cur.api_version).namespaced && cur.ns.empty()) cur.ns = "default";
      out.push_back(cur);
    }
    cur = Resource{};
    cur.addon = addon;
    top.clear();
    section.clear();
  };
  while (std::getline(lines, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.rfind("---", 0) == 0) {
      flush();
      continue;
    }
    const std::string t = trim(line);
    if (t.empty() || t[0] == '#') continue;
    const int ind = indent_of(line);
    const auto colon = t.find(':');
    if (colon == std::string::npos) continue;
    const std::string key = t.substr(0, colon);
    const std::string value = scalar(t.substr(colon + 1));
    if (ind == 0) {
      top = key;
      section.clear();
      if (key == "kind") cur.kind = value;
      if (key == "apiVersion") cur.api_version = value;
    } else if (ind == 2 && top == "metadata") {
      section = key;
      if (key == "name") cur.name = value;
      if (key == "namespace") cur.ns = value;
    } else if (ind == 2 && top == "spec") {
      section = key;
      if (key == "replicas") {
        try {
          cur.replicas = std::max(0, std::stoi(value));
        } catch (const std::exception&) {
        }
      }
    } else if (ind == 4 && top == "metadata" && section == "annotations") {
      if (key == "standin.flotilla.io/rollout" && value == "never") cur.never_ready = true;
    }
  }
  flush();
  return out;
}

KindInfo kind_info(const std::string& kind_or_plural, const std::string& api_version) {
  static const std::vector<KindInfo> kTable = {
      {"Namespace", "namespaces", "", "v1", false},
      {"Node", "nodes", "", "v1", false},
      {"ConfigMap", "configmaps", "", "v1", true},
      {"Secret", "secrets", "", "v1", true},
      {"Service", "services", "", "v1", true},
      {"ServiceAccount", "serviceaccounts", "", "v1", true},
      {"Deployment", "deployments", "apps", "v1", true},
      {"DaemonSet", "daemonsets", "apps", "v1", true},
      {"StatefulSet", "statefulsets", "apps", "v1", true},
      {"Job", "jobs", "batch", "v1", true},
      {"HelmChart", "helmcharts", "helm.cattle.io", "v1", true},
      {"Addon", "addons", "k3s.cattle.io", "v1", true},
      {"ClusterRole", "clusterroles", "rbac.authorization.k8s.io", "v1", false},
      {"ClusterRoleBinding", "clusterrolebindings", "rbac.authorization.k8s.io", "v1", false},
  };
  // "deployments.apps", "deployment", "Deployment", "deploy"...
  std::string name = kind_or_plural;
  const auto dot = name.find('.');
  std::string group = dot == std::string::npos ? "" : name.substr(dot + 1);
  if (dot != std::string::npos) name.resize(dot);
  const std::string l = lower(name);
  for (const auto& k : kTable) {
    if (l == lower(k.kind) || l == k.plural || (l == "deploy" && k.kind == "Deployment") ||
        (l == "ds" && k.kind == "DaemonSet") || (l == "cm" && k.kind == "ConfigMap") ||
        (l == "sts" && k.kind == "StatefulSet") || (l == "ns" && k.kind == "Namespace") ||
        (l == "no" && k.kind == "Node")) {
      if (group.empty() || group == k.group) return k;
    }
  }
  KindInfo k;
  k.kind = name;
  k.plural = l + (l.ends_with("s") ? "es" : "s");
  const auto slash = api_version.find('/');
  k.group = slash == std::string::npos ? group : api_version.substr(0, slash);
  k.version = slash == std::string::npos ? (api_version.empty() ? "v1" : api_version) : api_version.substr(slash + 1);
  return k;
}

std::string resource_path(const KindInfo& k, const std::string& ns, const std::string& name) {
  std::string p = k.group.empty() ? "/api/" + k.version : "/apis/" + k.group + "/" + k.version;
  if (k.namespaced) p += "/namespaces/" + (ns.empty() ? std::string("default") : ns);
  p += "/" + k.plural;
  if (!name.empty()) p += "/" + name;
  return p;
}

std::string resource_json(const Resource& r, size_t nodes) {
  const std::string meta = R"("metadata":{"name":")" + json_escape(r.name) + "\"" +
                           (r.ns.empty() ? "" : R"(,"namespace":")" + json_escape(r.ns) + "\"") +
                           R"(,"generation":)" + std::to_string(r.generation) + R"(,"labels":{"objectset.rio.cattle.io/owner-name":")" +
                           json_escape(r.addon) + R"("}})";
  const std::string head = R"({"apiVersion":")" + json_escape(r.api_version) + R"(","kind":")" +
                           json_escape(r.kind) + "\"," + meta;
  const std::string gen = std::to_string(r.generation);
  const int ready = r.never_ready ? 0 : r.replicas;
  // Status as the workload controllers would leave it once they settled:
  // everything available, or (rollout: never) nothing becoming ready.
  if (r.kind == "Deployment" || r.kind == "StatefulSet") {
    const std::string n = std::to_string(r.replicas);
    return head + R"(,"spec":{"replicas":)" + n + R"(},"status":{"observedGeneration":)" + gen +
           R"(,"replicas":)" + n + R"(,"updatedReplicas":)" + n + R"(,"readyReplicas":)" + std::to_string(ready) +
           R"(,"availableReplicas":)" + std::to_string(ready) + "}}\n";
  }
  if (r.kind == "DaemonSet") {
    const std::string n = std::to_string(nodes);
    return head + R"(,"status":{"observedGeneration":)" + gen + R"(,"desiredNumberScheduled":)" + n +
           R"(,"currentNumberScheduled":)" + n + R"(,"updatedNumberScheduled":)" + n + R"(,"numberReady":)" +
           (r.never_ready ? "0" : n) + R"(,"numberAvailable":)" + (r.never_ready ? "0" : n) + "}}\n";
  }
  if (r.kind == "Job") {
    return head + (r.never_ready ? R"(,"status":{"failed":1}})" : R"(,"status":{"succeeded":1}})") +
           std::string("\n");
  }
  if (r.kind == "HelmChart") {
    return head + R"(,"status":{"jobName":"helm-install-)" + json_escape(r.name) + "\"}}\n";
  }
  return head + "}\n";
}

}  // namespace flotilla::standin
