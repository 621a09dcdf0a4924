#pragma once
// The shared shape of flotilla-hub's and flotilla-agent's main(): parse
// options, print --help, validate, install signal handlers, run until
// SIGINT/SIGTERM. Exit codes: 0 clean stop, 1 runtime failure, 2 bad usage.
#include <atomic>
#include <functional>
#include <string>

#include "flotilla/common/options.hpp"
#include "flotilla/common/result.hpp"

namespace flotilla {

int daemon_main(Options& opts, int argc, char** argv, const std::string& logger,
                const std::function<Status(const Options&, const std::atomic<bool>& stop)>& run);

}  // namespace flotilla
