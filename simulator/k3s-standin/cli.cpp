#include <cstdio>
#include <string>

#include "standin.hpp"

namespace flotilla::standin {

namespace {

constexpr const char* kUsage =
    "usage: k3s --version | -v | version\n"
    "       k3s server [--config FILE] [k3s server flags]\n"
    "       k3s agent [--config FILE] --server URL --token TOKEN|--token-file FILE\n"
    "       k3s kubectl [--kubeconfig FILE] get --raw PATH\n"
    "       k3s kubectl [--kubeconfig FILE] get node[s] [NAME] [-o json]\n"
    "       k3s kubectl [--kubeconfig FILE] get KIND NAME [-n NAMESPACE] -o json\n"
    "       k3s kubectl [--kubeconfig FILE] delete -f FILE [--ignore-not-found]\n"
    "       k3s etcd-snapshot save [--name NAME] | ls\n"
    "       k3s certificate rotate\n"
    "       k3s-standin standin-build --version V [--flag key=value]... --out FILE\n"
    "       k3s --help\n";

constexpr const char* kHelp =
    "k3s stand-in for Flotilla tests and demos — NOT k3s.\n"
    "\n"
    "It imitates the commands and the on-disk behaviour the Flotilla edge agent\n"
    "depends on, so integration tests and the demo can run where real k3s cannot.\n"
    "It runs no containers, no kubelet and no real API server; see its README.md.\n"
    "\n"
    "Config keys (FILE, then FILE.d/*.yaml in lexical order): write-kubeconfig,\n"
    "  node-name, data-dir, https-listen-port, cluster-init, server, token,\n"
    "  token-file, and the stand-in's own standin-* knobs (README.md).\n"
    "\n"
    "Environment: K3S_CONFIG_FILE, K3S_STANDIN_VERSION, K3S_STANDIN_MAX_LIFETIME_S,\n"
    "  K3S_STANDIN_PIDFILE, K3S_STANDIN_KUBECTL_TIMEOUT_MS, KUBECONFIG, NOTIFY_SOCKET,\n"
    "  FLOTILLA_TEST_CLOCK_OFFSET_S\n";

}  // namespace

int run_cli(int argc, char** argv) {
  const char* argv0 = argc > 0 ? argv[0] : "k3s";
  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return 1;
  }
  const std::string command = argv[1];
  const Args rest(argv + 2, argv + argc);

  if (command == "--version" || command == "-v" || command == "version") {
    std::printf("k3s version %s (flotilla-standin)\n", resolve_version(argv0).c_str());
    std::printf("go version go1.22.5 (k3s stand-in, not real k3s)\n");
    return 0;
  }
  if (command == "--help" || command == "-h" || command == "help") {
    std::fputs(kHelp, stdout);
    std::fputs("\n", stdout);
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (command == "server") return run_server(argv0, rest);
  if (command == "agent") return run_agent(argv0, rest);
  if (command == "kubectl") return run_kubectl(rest);
  if (command == "etcd-snapshot") return run_etcd_snapshot(argv0, rest);
  if (command == "certificate") return run_certificate(argv0, rest);
  if (command == "standin-build") return run_standin_build(argv0, rest);

  std::fprintf(stderr, "k3s-standin: unsupported command \"%s\" (this is a k3s stand-in)\n", command.c_str());
  std::fputs(kUsage, stderr);
  return 1;
}

}  // namespace flotilla::standin
