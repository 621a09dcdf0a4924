// flotilla: the operator CLI. Local commands (key, bundle build/sign/verify/
// inspect, image inject) need no hub; the others call the hub's REST API.
#include <cstring>
#include <iostream>

#include "cli.hpp"
#include "flotilla/common/version.hpp"

namespace {
void usage(std::ostream& out) {
  out << "flotilla — operate a Flotilla fleet\n\n"
         "Usage: flotilla <command> <subcommand> [options]\n\n"
         "Local (no hub needed):\n"
         "  key generate            make an Ed25519 key pair (--encrypt: passphrase)\n"
         "  key init-root           root keyring v1: root keys, threshold, expiry\n"
         "  key init-signing        signing keyring v1: the keys that sign bundles\n"
         "  key add | revoke        next signing keyring version with a key added / revoked\n"
         "  key rotate              next root keyring version (signed by old and new roots)\n"
         "  key sign FILE           add a root key's signature to a keyring\n"
         "  key inspect FILE        show a keyring\n"
         "  key verify-chain        check root chain + signing keyring as a device would\n"
         "  bundle build DIR        build a bundle from DIR/bundle.yaml (files, artifacts, overlays)\n"
         "  bundle sign FILE        add a signature\n"
         "  bundle verify FILE      check it as a device would (--root/--signing or --key)\n"
         "  bundle inspect FILE     show what a bundle contains (--label: resolved files)\n"
         "  bundle diff A B         what changes from bundle A to bundle B\n"
         "  image inject INPUT      put the agent, its config and trust roots into a device image\n\n"
         "Hub (--hub URL, --token or FLOTILLA_TOKEN / FLOTILLA_TOKEN_FILE):\n"
         "  bundle push FILE        upload a signed bundle and its artifacts\n"
         "  bundle list             list uploaded bundles\n"
         "  enrollment-token create make a token devices enroll with (list, revoke ID)\n"
         "  token create NAME       make an API token --role viewer|operator|admin (list, revoke ID)\n"
         "  audit                   the audit log of mutating calls (admin)\n"
         "  trust push FILE         store the trust message (key verify-chain --out) on the hub (admin)\n"
         "  trust show              the trust message the hub holds\n"
         "  device list             list devices (--selector, --all with decommissioned)\n"
         "  device label ID k=v k-  set and remove labels\n"
         "  device decommission ID  revoke a device's broker access for good (--yes)\n"
         "  device get ID           one device\n"
         "  campaign create         roll a bundle out to the devices a selector matches\n"
         "  campaign list           all campaigns\n"
         "  campaign get|status ID  progress, failures (--wait: status block until done; --watch: bars)\n"
         "  campaign watch ID       follow per-wave progress bars live\n"
         "  campaign pause ID       stop releasing devices (resume ID carries on)\n"
         "  campaign resume ID      carry on after a pause\n"
         "  campaign abort ID       stop for good; devices not yet released are skipped\n"
         "  campaign rollback ID    return the devices that took the bundle to what they ran\n"
         "  campaign approve ID     let the wave waiting at an approval gate start\n"
         "  apply -f FILE|DIR|-     create or update the objects files declare (--dry-run=server,\n"
         "                          --applyset NAME --prune, --wait)\n"
         "  diff -f FILE|DIR|-      what apply would change (exit 0 none, 1 changes, 2 errors)\n"
         "  objects list            objects applied from files, with apply set and generation\n"
         "  gitrepo create NAME     follow a Git repository of such files (list, get, sync, delete)\n\n"
         "Output: -o table (default), wide, json or yaml on every command that prints objects.\n"
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
    std::cout << "flotilla " << flotilla::version() << "\n";
    return 0;
  }
  if (cmd == "key") return flotilla::cli::cmd_key(argc - 1, argv + 1);
  if (cmd == "bundle") return flotilla::cli::cmd_bundle(argc - 1, argv + 1);
  if (cmd == "campaign") return flotilla::cli::cmd_campaign(argc - 1, argv + 1);
  if (cmd == "device") return flotilla::cli::cmd_device(argc - 1, argv + 1);
  if (cmd == "enrollment-token") return flotilla::cli::cmd_enrollment_token(argc - 1, argv + 1);
  if (cmd == "token") return flotilla::cli::cmd_token(argc - 1, argv + 1);
  if (cmd == "audit") return flotilla::cli::cmd_audit(argc - 1, argv + 1);
  if (cmd == "trust") return flotilla::cli::cmd_trust(argc - 1, argv + 1);
  if (cmd == "image") return flotilla::cli::cmd_image(argc - 1, argv + 1);
  if (cmd == "apply") return flotilla::cli::cmd_apply(argc - 1, argv + 1);
  if (cmd == "diff") return flotilla::cli::cmd_diff(argc - 1, argv + 1);
  if (cmd == "objects") return flotilla::cli::cmd_objects(argc - 1, argv + 1);
  if (cmd == "gitrepo") return flotilla::cli::cmd_gitrepo(argc - 1, argv + 1);
  std::cerr << "flotilla: unknown command '" << cmd << "'\n\n";
  usage(std::cerr);
  return 2;
}
