#pragma once
#include <string>
#include <vector>

namespace flotilla::cli {

// Each command gets argv from its own name on and returns the exit code:
// 0 success, 1 the operation failed or was refused, 2 bad usage.
int cmd_key(int argc, char** argv);
int cmd_bundle(int argc, char** argv);
int cmd_campaign(int argc, char** argv);
int cmd_device(int argc, char** argv);
int cmd_cell(int argc, char** argv);
int cmd_enrollment_token(int argc, char** argv);
int cmd_token(int argc, char** argv);
int cmd_audit(int argc, char** argv);
int cmd_trust(int argc, char** argv);
int cmd_image(int argc, char** argv);
int cmd_apply(int argc, char** argv);
int cmd_diff(int argc, char** argv);
int cmd_objects(int argc, char** argv);
int cmd_gitrepo(int argc, char** argv);
// Regional hubs of a federation (region.cpp).
int cmd_region(int argc, char** argv);

int fail(const std::string& message, int code = 1);

}  // namespace flotilla::cli

#include <nlohmann/json_fwd.hpp>
namespace flotilla::cli {
// A federation's answer names regions that did not answer: say so on stderr,
// so a table is never silently short of a region (region.cpp).
void warn_regions(const nlohmann::json& answer);
}  // namespace flotilla::cli

namespace flotilla {
class Options;
}

namespace flotilla::cli {

// Parses a subcommand's options (argv[start..]: 2 after "command sub", 1 for
// commands without a subcommand) and checks the positional count and -o.
// Returns -1 to go on, or the exit code (0 after --help, 2 on a usage error).
int parse_args(Options& o, int argc, char** argv, std::vector<std::string>& pos, size_t min_pos, size_t max_pos,
               int start = 2);

}  // namespace flotilla::cli
