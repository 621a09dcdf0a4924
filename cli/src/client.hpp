#pragma once
// What every CLI command that talks to the hub shares: the hub/token flags,
// a small REST client and table helpers.
#include <chrono>
#include <nlohmann/json.hpp>
#include <string>

#include "flotilla/common/options.hpp"
#include "flotilla/common/result.hpp"

namespace flotilla::cli {

void add_hub_flags(Options& o);

struct Client {
  std::string base;
  std::string token;
  std::string ca_file;  // https: CAs trusted for the hub's certificate; empty = system store
  // Per request. An apply that creates a campaign over a large fleet takes
  // as long as the hub needs to assign every device a wave.
  std::chrono::seconds timeout{30};
  // The highest X-Flotilla-Revision the hub answered with in this run, sent
  // back on every later call as X-Flotilla-Min-Revision: behind a load
  // balancer over several hub processes, a later call is answered from a
  // store at least as new as an earlier one saw (a watch's counts never step
  // back, a read sees the write this run made). 0: none seen (one hub
  // without a control log sends none).
  mutable int64_t revision = 0;

  static Result<Client> from(const Options& o);
  // The parsed JSON body of a 2xx answer; otherwise the hub's error message.
  Result<nlohmann::json> call(const std::string& method, const std::string& path, const std::string& body = "",
                              const std::string& content_type = "application/json") const;
};

std::string pad(const std::string& s, size_t w);
std::string str(const nlohmann::json& j, const char* k);

}  // namespace flotilla::cli
