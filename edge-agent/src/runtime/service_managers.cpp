// systemd and OpenRC service managers: k3s installed as a service, the agent
// only asks the init system to (re)start it and whether it is active.
#include <openssl/asn1.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>

#include "flotilla/agent/direct_runtime.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/process.hpp"

namespace flotilla::agent {

std::string find_on_path(const std::string& program) {
  if (program.find('/') != std::string::npos) return program;
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/sbin:/usr/bin:/sbin:/bin";
  size_t start = 0;
  while (start <= dirs.size()) {
    size_t end = dirs.find(':', start);
    if (end == std::string::npos) end = dirs.size();
    std::filesystem::path cand = std::filesystem::path(dirs.substr(start, end - start)) / program;
    if (::access(cand.c_str(), X_OK) == 0) return cand.string();
    start = end + 1;
  }
  return {};
}

namespace {

class CommandServiceManager final : public ServiceManager {
 public:
  CommandServiceManager(std::string name, std::string tool, std::vector<std::string> restart,
                        std::vector<std::string> start, std::vector<std::string> stop, std::vector<std::string> active,
                        std::vector<std::vector<std::string>> install, std::chrono::milliseconds timeout)
      : name_(std::move(name)), tool_(std::move(tool)), restart_(std::move(restart)), start_(std::move(start)),
        stop_(std::move(stop)), active_(std::move(active)), install_(std::move(install)), timeout_(timeout) {}

  std::string name() const override { return name_; }
  Status restart() override { return run(restart_); }
  Status start() override { return run(start_); }
  void stop() override {
    if (auto s = run(stop_); !s) log::get("agent")->warn("{}", s.error().message);
  }
  Status install_service() override {
    // Each entry: the tool (empty = this manager's) and its arguments.
    for (const auto& call : install_) {
      std::vector<std::string> args(call.begin() + 1, call.end());
      if (auto s = run(args, call.front()); !s) return s;
    }
    return {};
  }
  bool active() override {
    std::vector<std::string> argv = {tool_};
    argv.insert(argv.end(), active_.begin(), active_.end());
    auto r = proc::run(argv, std::chrono::seconds(30), 4096);
    return r && r->exit_code == 0;
  }

 private:
  Status run(const std::vector<std::string>& args, const std::string& tool = "") {
    std::vector<std::string> argv = {tool.empty() ? tool_ : tool};
    argv.insert(argv.end(), args.begin(), args.end());
    std::string cmd;
    for (const auto& a : argv) cmd += (cmd.empty() ? "" : " ") + a;
    // A Type=notify restart returns once k3s is up: slow devices need long.
    auto r = proc::run(argv, timeout_, 16 * 1024);
    if (!r) return r.error().with_context(cmd);
    if (r->timed_out) return make_error(Errc::refused, cmd + " timed out");
    if (r->exit_code != 0) {
      std::string err = r->err.empty() ? r->out : r->err;
      while (!err.empty() && (err.back() == '\n' || err.back() == ' ')) err.pop_back();
      return make_error(Errc::refused, cmd + " exited " + std::to_string(r->exit_code) + ": " + err.substr(0, 300));
    }
    return {};
  }

  std::string name_, tool_;
  std::vector<std::string> restart_, start_, stop_, active_;
  std::vector<std::vector<std::string>> install_;
  std::chrono::milliseconds timeout_;
};

}  // namespace

Result<std::unique_ptr<ServiceManager>> make_systemd_manager(const std::string& unit,
                                                             std::chrono::milliseconds timeout) {
  const std::string tool = find_on_path("systemctl");
  if (tool.empty()) return make_error(Errc::not_found, "service-manager systemd: systemctl is not on PATH");
  // A unit written on disk is unknown to systemd until daemon-reload
  // (install.sh: systemctl daemon-reload, enable).
  return std::unique_ptr<ServiceManager>(new CommandServiceManager(
      "systemd", tool, {"restart", unit}, {"start", unit}, {"stop", unit}, {"is-active", "--quiet", unit},
      {{"", "daemon-reload"}, {"", "enable", unit}}, timeout));
}

Result<std::unique_ptr<ServiceManager>> make_openrc_manager(const std::string& service,
                                                            std::chrono::milliseconds timeout) {
  const std::string tool = find_on_path("rc-service");
  if (tool.empty()) return make_error(Errc::not_found, "service-manager openrc: rc-service is not on PATH");
  std::vector<std::vector<std::string>> install;
  // install.sh: rc-update add k3s default.
  if (const std::string update = find_on_path("rc-update"); !update.empty()) install.push_back({update, "add", service, "default"});
  return std::unique_ptr<ServiceManager>(new CommandServiceManager(
      "openrc", tool, {service, "restart"}, {service, "start"}, {service, "stop"}, {service, "status"},
      std::move(install), timeout));
}

std::string detect_service_manager(const std::filesystem::path& root) {
  std::error_code ec;
  if (std::filesystem::is_directory(root / "run/systemd/system", ec)) return "systemd";
  if (std::filesystem::exists(root / "sbin/openrc-run", ec)) return "openrc";
  return "direct";
}

Result<int64_t> pem_cert_not_after(const std::filesystem::path& pem) {
  FILE* f = std::fopen(pem.c_str(), "r");
  if (!f) return make_error(Errc::not_found, "cannot open " + pem.string());
  X509* cert = PEM_read_X509(f, nullptr, nullptr, nullptr);
  std::fclose(f);
  if (!cert) return make_error(Errc::parse, pem.string() + " holds no PEM certificate");
  struct tm t {};
  const int ok = ASN1_TIME_to_tm(X509_get0_notAfter(cert), &t);
  X509_free(cert);
  if (ok != 1) return make_error(Errc::parse, pem.string() + ": bad notAfter");
  return static_cast<int64_t>(::timegm(&t));
}

}  // namespace flotilla::agent
