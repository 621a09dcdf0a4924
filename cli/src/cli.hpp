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
int cmd_enrollment_token(int argc, char** argv);

int fail(const std::string& message, int code = 1);

}  // namespace flotilla::cli
