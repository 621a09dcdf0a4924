// The stand-in's maintenance commands: `k3s etcd-snapshot`, `k3s certificate
// rotate`, and `standin-build` (a copy of the stand-in that is another k3s
// version, for upgrade tests).
#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "standin.hpp"

namespace flotilla::standin {

namespace fs = std::filesystem;

namespace {

const std::vector<std::string> kAdminFlags = {"data-dir", "name", "etcd-snapshot-dir", "service", "node-name",
                                              "write-kubeconfig", "out", "version", "flag", "token", "server"};

std::string node_name_of(const ConfigValues& cfg) {
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  return cfg.get("node-name", host[0] ? host : "localhost");
}

bool pid_alive(const std::string& pidfile) {
  const auto text = read_file(pidfile);
  if (!text) return false;
  try {
    const pid_t pid = static_cast<pid_t>(std::stol(*text));
    return pid > 0 && ::kill(pid, 0) == 0;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

// pkg/cli/etcdsnapshot: `save` takes an on-demand snapshot of the running
// embedded etcd into ${data-dir}/server/db/snapshots as
// <name>-<node>-<unix time> (default name "on-demand"); `ls` lists them.
int run_etcd_snapshot(const char* argv0, const Args& args) {
  try {
    const ConfigValues cfg = load_config(args, kAdminFlags);
    const std::string sub = cfg.positional.empty() ? "save" : cfg.positional[0];
    const std::string data_dir = cfg.get("data-dir");
    if (data_dir.empty()) throw std::runtime_error("data-dir is not set (the stand-in needs it)");
    extract_data_dir(data_dir, resolve_build(argv0));
    const fs::path db = fs::path(data_dir) / "server/db";
    const fs::path dir = cfg.get("etcd-snapshot-dir").empty() ? db / "snapshots" : fs::path(cfg.get("etcd-snapshot-dir"));
    std::error_code ec;
    if (sub == "ls" || sub == "list" || sub == "l") {
      std::printf("Name Location Size Created\n");
      for (const auto& e : fs::directory_iterator(dir, ec)) {
        std::printf("%s file://%s %ju %s\n", e.path().filename().c_str(), e.path().c_str(),
                    static_cast<uintmax_t>(fs::file_size(e.path(), ec)),
                    rfc3339(static_cast<int64_t>(fs::last_write_time(e.path(), ec).time_since_epoch().count() /
                                                 1000000000))
                        .c_str());
      }
      return 0;
    }
    if (sub != "save") throw std::runtime_error("unknown etcd-snapshot command \"" + sub + "\" (save, ls)");
    if (!fs::exists(db / "etcd", ec)) {
      throw std::runtime_error("etcd database not found in " + (db / "etcd").string() +
                               " (this server keeps its datastore in SQLite)");
    }
    if (!pid_alive((db / "etcd/standin.pid").string())) {
      throw std::runtime_error("failed to get etcd status: context deadline exceeded (is k3s running?)");
    }
    const auto content = read_file(datastore_path(data_dir, true));
    if (!content) throw std::runtime_error("etcd database is empty");
    const std::string name = cfg.get("name", "on-demand") + "-" + node_name_of(cfg) + "-" + std::to_string(now_unix());
    fs::create_directories(dir, ec);
    write_file_atomic((dir / name).string(), *content, 0600);
    log_line("Saving etcd snapshot to " + (dir / name).string());
    std::printf("Snapshot %s saved.\n", name.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FATA[0000] %s\n", e.what());
    return 1;
  }
}

// pkg/cli/cert: `k3s certificate rotate` moves the node's leaf certificates
// (not the CAs) to ${data-dir}/server/tls-<unix time> and deletes them; k3s
// issues new ones at its next start (k3s-io/k3s#4632; docs: stop k3s,
// rotate, start k3s). The stand-in is stricter than k3s, which does not
// check: it refuses while this data dir's k3s runs, because rotating under a
// running k3s leaves it serving certificates whose files are gone, and the
// agent must be seen to stop k3s first.
int run_certificate(const char* argv0, const Args& args) {
  try {
    const ConfigValues cfg = load_config(args, kAdminFlags);
    const std::string sub = cfg.positional.empty() ? "" : cfg.positional[0];
    if (sub != "rotate") throw std::runtime_error("usage: k3s certificate rotate [--service NAME]");
    const std::string data_dir = cfg.get("data-dir");
    if (data_dir.empty()) throw std::runtime_error("data-dir is not set (the stand-in needs it)");
    extract_data_dir(data_dir, resolve_build(argv0));
    std::error_code ec;
    const bool server = fs::exists(fs::path(data_dir) / "server/tls", ec);
    if (pid_alive((fs::path(data_dir) / (server ? "server" : "agent") / "standin.pid").string())) {
      throw std::runtime_error("k3s is running on " + data_dir + "; stop it before rotating certificates");
    }
    const fs::path tls = server ? fs::path(data_dir) / "server/tls" : fs::path(data_dir) / "agent";
    const fs::path backup = fs::path(data_dir) / (server ? "server" : "agent") /
                            ((server ? "tls-" : "tls-agent-") + std::to_string(now_unix()));
    fs::create_directories(backup, ec);
    int moved = 0;
    for (const auto& e : fs::directory_iterator(tls, ec)) {
      const std::string f = e.path().filename().string();
      const bool leaf = (f.ends_with(".crt") || f.ends_with(".key")) && f.find("-ca.") == std::string::npos;
      if (!leaf || !e.is_regular_file()) continue;
      fs::copy_file(e.path(), backup / f, fs::copy_options::overwrite_existing, ec);
      fs::remove(e.path(), ec);
      ++moved;
    }
    if (moved == 0) throw std::runtime_error("no certificates found in " + tls.string());
    std::printf("Successfully backed up certificates to %s, please restart k3s %s to rotate certificates\n",
                backup.c_str(), server ? "server" : "agent");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FATA[0000] %s\n", e.what());
    return 1;
  }
}

// Not a k3s command: writes a copy of this binary that reports another
// version and behaves as told (README.md, "Builds").
int run_standin_build(const char* /*argv0*/, const Args& args) {
  std::string version, out;
  std::vector<std::string> flags;
  for (size_t i = 0; i + 1 < args.size(); i += 2) {
    if (args[i] == "--version") version = args[i + 1];
    else if (args[i] == "--out") out = args[i + 1];
    else if (args[i] == "--flag") flags.push_back(args[i + 1]);
    else {
      std::fprintf(stderr, "standin-build: unknown argument %s\n", args[i].c_str());
      return 2;
    }
  }
  if (version.empty() || out.empty() || version.find_first_of(";\n ") != std::string::npos) {
    std::fprintf(stderr, "usage: k3s-standin standin-build --version VERSION [--flag key=value]... --out FILE\n");
    return 2;
  }
  const auto self = read_file(self_exe());
  if (!self) {
    std::fprintf(stderr, "standin-build: cannot read %s\n", self_exe().c_str());
    return 1;
  }
  // A build of a build keeps only the new trailer.
  std::string body = *self;
  if (const auto at = body.rfind(kTrailerMarker); at != std::string::npos && body.size() - at < 4096) body.resize(at);
  std::string trailer = std::string(kTrailerMarker) + "version=" + version;
  for (const auto& f : flags) {
    if (f.find_first_of(";\n") != std::string::npos) {
      std::fprintf(stderr, "standin-build: bad flag %s\n", f.c_str());
      return 2;
    }
    trailer += ";" + f;
  }
  try {
    write_file_atomic(out, body + trailer + "\n", 0755);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "standin-build: %s\n", e.what());
    return 1;
  }
  return 0;
}

}  // namespace flotilla::standin
