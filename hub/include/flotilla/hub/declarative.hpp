#pragma once
// Declarative files: documents of kind Campaign, EnrollmentToken, ApiToken,
// BundlePublication and GitRepo in a kubectl-like shape (apiVersion, kind,
// metadata {name, project, labels}, spec), YAML or JSON, one or many per file.
// parse_documents is the one parser: `POST /v1/apply` (the CLI's `apply` and
// `diff`) and Git sync both use it, and HubService::apply applies what it
// returns in one store transaction (docs/adr/0008-declarative-apply.md).
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "flotilla/common/result.hpp"
#include "flotilla/hub/api.hpp"
#include "flotilla/hub/campaign.hpp"
#include "flotilla/hub/store.hpp"

namespace flotilla::hub {

inline constexpr const char* kApiVersion = "flotilla.dev/v1";
// KEP-3659's applyset.kubernetes.io/part-of, for Flotilla: every object applied
// with --applyset carries it, and --prune removes only objects that carry
// the same value. Reserved: a file may not set it.
inline constexpr const char* kApplySetLabel = "applyset.flotilla.dev/part-of";
// Git sync's apply sets are "gitrepo-<name>"; `flotilla apply` may not use the prefix.
inline constexpr const char* kGitApplySetPrefix = "gitrepo-";

// Bounds on one apply (REST body or Git commit).
inline constexpr size_t kMaxApplyFiles = 500;
inline constexpr size_t kMaxApplyDocuments = 500;
inline constexpr size_t kMaxApplyFileBytes = 1u << 20;
inline constexpr size_t kMaxApplyBlobs = 32;
inline constexpr size_t kMaxApplyBody = 8u << 20;  // the HTTP server's hard cap
// Nodes one YAML document may expand to (aliases included: no billion laughs).
inline constexpr size_t kMaxDocumentNodes = 20000;
inline constexpr int kMaxDocumentDepth = 32;
inline constexpr size_t kMaxReportedErrors = 20;

enum class Kind { bundle_publication, enrollment_token, api_token, git_repo, campaign };
// The order an apply creates them in: a campaign may use a bundle published
// by the same apply. Pruning goes the other way.
inline constexpr Kind kApplyOrder[] = {Kind::bundle_publication, Kind::enrollment_token, Kind::api_token,
                                       Kind::git_repo, Kind::campaign};
std::string kind_name(Kind k);  // "Campaign", ...
std::optional<Kind> parse_kind(const std::string& s);
// The role an API token needs to apply or prune objects of this kind.
Role role_for(Kind k);

// Object (and project) names: DNS labels, at most 63 of a-z 0-9 and '-'.
bool valid_object_name(const std::string& n);

// A file as the CLI or Git hands it over: its path relative to the apply's
// root ('/'-separated) and its bytes.
struct SourceFile {
  std::string path;
  std::string content;
};

// Reads a file a document refers to (a .fbundle) by its path relative to the
// root, already normalised and confined to it.
using BlobReader = std::function<Result<std::string>(const std::string& path)>;

struct GitRepoSpec {
  std::string url;
  std::string branch = "main";
  std::string path;  // "" = the repository's top directory
  std::chrono::milliseconds interval{std::chrono::minutes(1)};
};

// One validated document.
struct Document {
  Kind kind = Kind::campaign;
  std::string source;   // "campaigns.yaml doc 2": how errors name it
  std::string name;
  std::string project;  // as written; "" = the caller's
  Labels labels;
  nlohmann::json spec;  // as written (YAML turned into JSON)

  // Campaign
  std::string bundle, selector;
  Strategy strategy;
  bool paused = false;
  // EnrollmentToken, ApiToken (ttl 0 = no expiry)
  Labels token_labels;
  int64_t max_uses = 0;
  std::chrono::milliseconds ttl{0};
  std::string role;
  // BundlePublication: the normalised path and the bytes read through it
  std::string file;
  std::string bundle_bytes;
  // GitRepo
  GitRepoSpec repo;
};

struct ParseOptions {
  // Git sync refuses GitRepo documents: a repository does not declare repositories.
  bool allow_git_repo = true;
};

// Parses and validates every document of every file without touching the
// hub. Every problem found (up to kMaxReportedErrors) is reported, each
// naming the file, the document and the field: "campaigns.yaml doc 2:
// spec.strategy.waves: ...". Documents come back in file order.
Result<std::vector<Document>> parse_documents(const std::vector<SourceFile>& files, const BlobReader& read_blob,
                                              const ParseOptions& opts = {});

// A GitRepo's spec (url, branch, path, interval): the same checks for REST
// and for files. Errors name the field ("spec.url: ...").
Status parse_git_repo_spec(const nlohmann::json& spec, GitRepoSpec& out);

// YAML (or JSON) text to JSON documents, with the core schema's scalars
// (true, 12, 1.5, null; quoted stays a string), duplicate keys refused and
// the size bounded. Exposed for tests.
Result<std::vector<nlohmann::json>> yaml_documents(const std::string& text);

// Who applies: an API token's project and role, or a GitRepo's.
struct ApplyScope {
  std::string project = "*";
  Role role = Role::viewer;
  std::string actor;                // for logs
  std::string owner = "your token";  // who the project comes from, for errors
};

struct ApplyRequest {
  std::vector<Document> documents;
  std::string apply_set;  // "" = none
  bool prune = false;     // needs apply_set
  bool dry_run = false;
};

// What happened (or, in a dry run, would happen) to one object.
struct ObjectOutcome {
  Kind kind = Kind::campaign;
  std::string project, name, source;
  std::string action;  // created, configured, unchanged, pruned
  int64_t generation = 0;
  int64_t observed_generation = 0;
  std::string target;  // campaign id, token id, bundle id or GitRepo name
  nlohmann::json live;     // what the hub held before (null when new)
  nlohmann::json desired;  // what the files declare (null when pruned)
  std::string detail;
  // Campaigns: devices per wave of the (new) run, from assign_waves.
  std::vector<std::pair<std::string, int64_t>> waves;
  int64_t devices = 0;
  // Created tokens, shown once (never in a dry run, never logged).
  std::string secret;
};

struct ApplyOutcome {
  bool dry_run = false;
  std::string apply_set;
  std::vector<ObjectOutcome> objects;
  size_t changed() const;
};

nlohmann::json outcome_json(const ApplyOutcome& o);
nlohmann::json applied_object_json(const AppliedObject& o);

// Campaign ids of declared campaigns are derived from their name, so a dry
// run assigns devices to waves exactly as the apply will.
std::string declared_campaign_id(const std::string& project, const std::string& name, int run);

}  // namespace flotilla::hub
