#include <cstdio>
#include <string>

#include "standin.hpp"

namespace flotilla::standin {

namespace {

constexpr const char* kUsage =
    "usage: k3s --version | -v | version\n"
    "       k3s server [--config FILE] [other k3s flags, ignored]\n"
    "       k3s kubectl [--kubeconfig FILE] get --raw PATH\n"
    "       k3s kubectl [--kubeconfig FILE] get node NAME\n"
    "       k3s --help\n";

constexpr const char* kHelp =
    "k3s stand-in for Flotilla tests and demos — NOT k3s.\n"
    "\n"
    "It imitates only the commands the Flotilla edge agent runs against k3s,\n"
    "so integration tests and the demo can run where real k3s cannot.\n"
    "It runs no containers, no kubelet and no real API server.\n"
    "\n"
    "Supported surface:\n"
    "  --version, -v, version   print the (configurable) k3s version\n"
    "  server --config FILE     serve /readyz, /livez, /version and\n"
    "                           /api/v1/nodes/<node-name> over plain HTTP on\n"
    "                           127.0.0.1 and write a kubeconfig\n"
    "  kubectl get --raw PATH   GET PATH from the server in the kubeconfig\n"
    "  kubectl get node NAME    one-line node table\n"
    "\n"
    "Config keys (FILE, then FILE.d/*.yaml in lexical order):\n"
    "  write-kubeconfig, node-name, data-dir (ignored), https-listen-port,\n"
    "  standin-ready-delay-ms, standin-never-ready, standin-fail-start\n"
    "\n"
    "Environment: K3S_STANDIN_VERSION, K3S_STANDIN_MAX_LIFETIME_S,\n"
    "  K3S_STANDIN_PIDFILE, K3S_STANDIN_KUBECTL_TIMEOUT_MS, KUBECONFIG\n"
    "A file <binary>.version next to the binary overrides the version.\n";

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
  if (command == "kubectl") return run_kubectl(rest);

  std::fprintf(stderr, "k3s-standin: unsupported command \"%s\" (this is a k3s stand-in)\n",
               command.c_str());
  std::fputs(kUsage, stderr);
  return 1;
}

}  // namespace flotilla::standin
