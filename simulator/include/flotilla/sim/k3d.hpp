#pragma once
// The k3d backend: N real k3s clusters in Docker (k3d), each with the real
// flotilla-agent adopting it. The agent is unchanged: it drives "k3s" through
// a shim installed as <root>/usr/local/bin/k3s that forwards to the cluster's
// server container (docs/simulator.md, "k3d backend").
#include <string>
#include <vector>

#include "flotilla/common/result.hpp"

namespace flotilla::sim {

struct K3dOptions {
  uint32_t clusters = 1;
  std::string work_dir;           // agent roots and logs
  std::string hub_url;
  std::string enrollment_token;
  std::vector<std::string> root_keys;  // ed25519:<b64>
  std::string agent_bin;          // flotilla-agent
  std::string k3s_image;          // --image for k3d; empty = k3d's default
  bool dry_run = false;           // print the commands, run nothing
  bool keep = false;              // leave clusters behind on exit
};

// Plain reasons when Docker or k3d is missing; empty when both are usable.
std::string k3d_missing_tools();

// The commands the backend runs to create cluster i (argv form).
std::vector<std::vector<std::string>> k3d_create_commands(const K3dOptions& o, uint32_t i);
std::string k3d_cluster_name(uint32_t i);
// The shim that makes a k3d server container look like a local k3s to the agent.
std::string k3d_k3s_shim(const std::string& cluster);

// Creates the clusters, installs the shims, starts one agent per cluster and
// waits for Ctrl-C (or returns at once with dry_run). Returns the exit code.
int run_k3d(const K3dOptions& o);

}  // namespace flotilla::sim
