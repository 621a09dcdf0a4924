// flotilla: the operator CLI. Local commands (key, bundle build/sign/verify/
// inspect, image inject) need no hub; the others call the hub's REST API.
#include <cstring>
#include <iostream>
#include <string_view>

#include "cli.hpp"
#include "contexts.hpp"
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
         "Contexts (like kubeconfig; flags > FLOTILLA_HUB, FLOTILLA_TOKEN... > context):\n"
         "  config set-context NAME --hub URL --token-file FILE   add or change a context\n"
         "  config use-context NAME  make it current (get-contexts, current-context, delete-context)\n\n"
         "Hub (--hub URL, --token or FLOTILLA_TOKEN / FLOTILLA_TOKEN_FILE, or the current context):\n"
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
         "  cell list               the hub's cells: broker, state, devices (operator)\n"
         "  cell drain ID           move a cell's devices to the other cells (admin; --no-wait)\n"
         "  cell undrain ID         stop a cell's drain; moves not yet taken are withdrawn (admin)\n"
         "  cell crl-sync           keep a cell broker's revocation list current (--out, --device-ca)\n"
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
         "  gitrepo create NAME     follow a Git repository of such files (list, get, sync, delete)\n"
         "  region add NAME         a federation's regional hub: --url https://.. --ca-file --region-token-file\n"
         "                          (list, remove NAME; admin)\n\n"
         "Shell:\n"
         "  completion bash         a bash completion script (source it, or see the flotilla package)\n\n"
         "Output: -o table (default), wide, json or yaml on every command that prints objects.\n"
         "Run 'flotilla <command> <subcommand> --help' for the options of each.\n";
}

// The command table: dispatch and shell completion read the same list, so a
// new command is completed as soon as it exists.
struct Command {
  std::string_view name;
  int (*run)(int, char**);
  std::string_view subcommands;  // space-separated; empty: the command takes arguments directly
};

int cmd_completion(int argc, char** argv);

constexpr Command kCommands[] = {
    {"key", flotilla::cli::cmd_key, "generate init-root init-signing add revoke rotate sign inspect verify-chain"},
    {"bundle", flotilla::cli::cmd_bundle, "build sign verify inspect diff push list"},
    {"campaign", flotilla::cli::cmd_campaign,
     "create list get status watch pause resume abort rollback approve"},
    {"device", flotilla::cli::cmd_device, "list get label decommission"},
    {"cell", flotilla::cli::cmd_cell, "list drain crl-sync"},
    {"enrollment-token", flotilla::cli::cmd_enrollment_token, "create list revoke"},
    {"token", flotilla::cli::cmd_token, "create list revoke"},
    {"audit", flotilla::cli::cmd_audit, ""},
    {"trust", flotilla::cli::cmd_trust, "push show"},
    {"image", flotilla::cli::cmd_image, "inject"},
    {"apply", flotilla::cli::cmd_apply, ""},
    {"diff", flotilla::cli::cmd_diff, ""},
    {"objects", flotilla::cli::cmd_objects, "list"},
    {"gitrepo", flotilla::cli::cmd_gitrepo, "create list get sync delete"},
    {"region", flotilla::cli::cmd_region, "add list remove"},
    {"config", flotilla::cli::cmd_config, "get-contexts current-context use-context set-context delete-context"},
    {"completion", cmd_completion, "bash"},
};

// A bash completion script: commands and subcommands from kCommands; flags
// from the subcommand's own --help at completion time (always current);
// -o values; files otherwise.
void bash_completion(std::ostream& out) {
  out << "# bash completion for flotilla, generated by `flotilla completion bash`\n"
         "_flotilla() {\n"
         "  local cur=\"${COMP_WORDS[COMP_CWORD]}\" prev=\"${COMP_WORDS[COMP_CWORD-1]}\"\n"
         "  local cmd=\"${COMP_WORDS[1]}\" subs=\"\"\n"
         "  case \"$cmd\" in\n";
  for (const auto& c : kCommands) out << "    " << c.name << ") subs=\"" << c.subcommands << "\" ;;\n";
  out << "  esac\n"
         "  if [ \"$COMP_CWORD\" -eq 1 ]; then\n"
         "    COMPREPLY=($(compgen -W \"";
  for (size_t i = 0; i < std::size(kCommands); ++i) out << (i ? " " : "") << kCommands[i].name;
  out << " help\" -- \"$cur\"))\n"
         "    return\n"
         "  fi\n"
         "  if [ \"$COMP_CWORD\" -eq 2 ] && [ -n \"$subs\" ]; then\n"
         "    COMPREPLY=($(compgen -W \"$subs\" -- \"$cur\"))\n"
         "    return\n"
         "  fi\n"
         "  if [ \"$prev\" = \"-o\" ]; then\n"
         "    COMPREPLY=($(compgen -W \"table wide json yaml\" -- \"$cur\"))\n"
         "    return\n"
         "  fi\n"
         "  if [[ \"$cur\" == -* ]]; then\n"
         "    local help\n"
         "    if [ -n \"$subs\" ]; then help=$(\"${COMP_WORDS[0]}\" \"$cmd\" \"${COMP_WORDS[2]}\" --help 2>/dev/null)\n"
         "    else help=$(\"${COMP_WORDS[0]}\" \"$cmd\" --help 2>/dev/null); fi\n"
         "    COMPREPLY=($(compgen -W \"$(printf '%s\\n' \"$help\" | grep -oE -- '--[a-z0-9][a-z0-9-]*' | sort -u)\" -- \"$cur\"))\n"
         "    return\n"
         "  fi\n"
         "  COMPREPLY=($(compgen -f -- \"$cur\"))\n"
         "}\n"
         "complete -o filenames -F _flotilla flotilla\n";
}

int cmd_completion(int argc, char** argv) {
  const std::string shell = argc > 1 ? argv[1] : "";
  if (shell == "bash") {
    bash_completion(std::cout);
    return 0;
  }
  std::cerr << "Usage: flotilla completion bash   (prints a bash completion script;\n"
               "       e.g. flotilla completion bash > ~/.local/share/bash-completion/completions/flotilla)\n";
  return shell == "--help" || shell == "-h" ? 0 : 2;
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
  for (const auto& c : kCommands) {
    if (cmd == c.name) return c.run(argc - 1, argv + 1);
  }
  std::cerr << "flotilla: unknown command '" << cmd << "'\n\n";
  usage(std::cerr);
  return 2;
}
