// flotilla: the operator CLI. Local commands (key, bundle build/sign/verify/
// inspect) need no hub; the others call the hub's REST API.
#include <cstring>
#include <iostream>

#include "cli.hpp"

namespace {
void usage(std::ostream& out) {
  out << "flotilla — operate a Flotilla fleet\n\n"
         "Usage: flotilla <command> <subcommand> [options]\n\n"
         "Local (no hub needed):\n"
         "  key generate            make an Ed25519 signing key pair\n"
         "  bundle build DIR        build a bundle from DIR/bundle.yaml\n"
         "  bundle sign FILE        add a signature\n"
         "  bundle verify FILE      check signatures against trusted keys\n"
         "  bundle inspect FILE     show what a bundle contains\n\n"
         "Hub (--hub URL, --token or FLOTILLA_TOKEN / FLOTILLA_TOKEN_FILE):\n"
         "  bundle push FILE        upload a signed bundle\n"
         "  bundle list             list uploaded bundles\n"
         "  enrollment-token create make a token devices enroll with\n"
         "  device list             list devices (--selector)\n"
         "  device get ID           one device\n"
         "  campaign create         roll a bundle out to the devices a selector matches\n"
         "  campaign status ID      progress (--watch to follow it live)\n"
         "  campaign list           all campaigns\n\n"
         "Run 'flotilla <command> <subcommand> --help' for the options of each.\n";
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    usage(std::cout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  if (cmd == "--version" || cmd == "version") {
    std::cout << "flotilla 0.1.0\n";
    return 0;
  }
  if (cmd == "key") return flotilla::cli::cmd_key(argc - 1, argv + 1);
  if (cmd == "bundle") return flotilla::cli::cmd_bundle(argc - 1, argv + 1);
  if (cmd == "campaign") return flotilla::cli::cmd_campaign(argc - 1, argv + 1);
  if (cmd == "device") return flotilla::cli::cmd_device(argc - 1, argv + 1);
  if (cmd == "enrollment-token") return flotilla::cli::cmd_enrollment_token(argc - 1, argv + 1);
  std::cerr << "flotilla: unknown command '" << cmd << "'\n\n";
  usage(std::cerr);
  return 2;
}
