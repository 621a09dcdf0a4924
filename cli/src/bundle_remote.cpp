// bundle push / bundle list: bundles and their artifacts on the hub.
#include <filesystem>
#include <fstream>
#include <iostream>

#include "cli.hpp"
#include "client.hpp"
#include "output.hpp"
#include "flotilla/bundles/artifact.hpp"
#include "flotilla/bundles/bundle.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/fs.hpp"

namespace flotilla::cli {

using nlohmann::json;

namespace {

// Where an artifact's bytes may be: each --artifacts-dir, then FILE.artifacts/
// (what `bundle build` fills), then FILE's own directory; named by sha256 hex
// or by the artifact's name.
std::optional<std::filesystem::path> find_artifact(const v1::Artifact& a, const std::string& bundle_path,
                                                   const std::vector<std::string>& dirs) {
  std::vector<std::filesystem::path> search(dirs.begin(), dirs.end());
  search.emplace_back(bundle_path + ".artifacts");
  search.push_back(std::filesystem::path(bundle_path).parent_path().empty()
                       ? std::filesystem::path(".")
                       : std::filesystem::path(bundle_path).parent_path());
  const std::string hex = to_hex(a.sha256());
  for (const auto& d : search) {
    for (const auto& name : {hex, a.name()}) {
      std::error_code ec;
      if (std::filesystem::is_regular_file(d / name, ec)) return d / name;
    }
  }
  return std::nullopt;
}

// Reads the file and checks it against the signed size and hash before
// anything is sent: a wrong local file must fail here, not on every device.
Result<std::string> read_checked(const v1::Artifact& a, const std::filesystem::path& path) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) return make_error(Errc::io, path.string() + ": " + ec.message());
  if (size != a.size()) {
    return make_error(Errc::invalid_argument, path.string() + " is " + std::to_string(size) +
                                                  " bytes; the bundle says artifact " + a.name() + " is " +
                                                  std::to_string(a.size()));
  }
  auto bytes = fs::read_file(path, a.size());
  if (!bytes) return bytes.error();
  bundles::ArtifactChecker check(a);
  if (check.feed(*bytes) != v1::REASON_NONE || check.finish() != v1::REASON_NONE) {
    return make_error(Errc::invalid_argument, path.string() + ": " + check.message());
  }
  return bytes;
}

}  // namespace

int remote_bundle(const std::string& sub, int argc, char** argv) {
  Options o("flotilla bundle " + sub,
            sub == "push" ? "Usage: flotilla bundle push FILE [--artifacts-dir DIR ...] [--skip-artifacts]\n\n"
                            "Uploads the bundle's artifacts (PUT /v1/artifacts/<sha256>; the hub checks the\n"
                            "hash) and then the signed bundle. Artifact bytes are looked up by sha256 or name\n"
                            "in each --artifacts-dir, FILE.artifacts/ (written by 'bundle build') and FILE's\n"
                            "directory, and checked against the signed size and hash first. Artifacts with\n"
                            "an absolute url are hosted elsewhere and not uploaded."
                          : "Usage: flotilla bundle list",
            "FLOTILLA_");
  add_hub_flags(o);
  if (sub == "push") {
    o.add_list("artifacts-dir", "directory holding artifact files").add_switch("skip-artifacts",
                                                                               "upload only the bundle");
  }
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, sub == "push" ? 1 : 0, sub == "push" ? 1 : 0); rc >= 0) return rc;
  auto c = Client::from(o);
  if (!c) return fail(c.error().message, 2);
  if (sub == "push") {
    auto bytes = fs::read_file(pos[0], bundles::kMaxEnvelopeBytes);
    if (!bytes) return fail(bytes.error().message);
    auto envelope = bundles::parse_envelope(*bytes);
    if (!envelope) return fail(envelope.error().message);
    v1::BundleManifest m;
    if (!m.ParseFromString(envelope->manifest())) return fail(pos[0] + ": manifest does not parse");
    if (!o.get_bool("skip-artifacts")) {
      // Find and check every artifact before uploading any, so a missing
      // file leaves the hub as it was.
      std::vector<std::pair<const v1::Artifact*, std::filesystem::path>> uploads;
      for (const auto& a : m.artifacts()) {
        if (a.url().find("://") != std::string::npos) continue;
        auto path = find_artifact(a, pos[0], o.get_list("artifacts-dir"));
        if (!path) {
          return fail("artifact " + a.name() + " (sha256 " + to_hex(a.sha256()) + ") not found; pass --artifacts-dir",
                      1);
        }
        uploads.emplace_back(&a, *path);
      }
      for (const auto& [a, path] : uploads) {
        auto data = read_checked(*a, path);
        if (!data) return fail(data.error().message);
        const std::string hex = to_hex(a->sha256());
        auto r = c->call("PUT", "/v1/artifacts/" + hex, *data, "application/octet-stream");
        if (!r) return fail("upload of artifact " + a->name() + ": " + r.error().message);
        if (o.get("o") == "table" || o.get("o") == "wide") std::cout << "uploaded artifact " << a->name() << " (" << a->size() << " bytes, sha256 " << hex.substr(0, 16) << ")\n";
      }
    }
    auto r = c->call("POST", "/v1/bundles", *bytes, "application/octet-stream");
    if (!r) return fail(r.error().message);
    if (!print_structured(o, *r)) std::cout << "pushed " << str(*r, "name") << " v" << str(*r, "version") << " as bundle " << str(*r, "id") << "\n";
    return 0;
  }
  auto r = c->call("GET", "/v1/bundles");
  if (!r) return fail(r.error().message);
  if (print_structured(o, *r)) return 0;
  const bool w = wide(o);
  Table t(w ? std::vector<std::string>{"ID", "NAME", "VERSION", "CHANNEL", "EXPIRES", "SIGNATURES", "UPLOADED", "DIGEST"}
            : std::vector<std::string>{"ID", "NAME", "VERSION", "CHANNEL", "EXPIRES"});
  for (const auto& b : (*r)["items"]) {
    std::vector<std::string> row{str(b, "id"), str(b, "name"), str(b, "version"), str(b, "channel"),
                                 str(b, "expires_at")};
    if (w) {
      for (const char* k : {"signatures", "uploaded_at", "digest"}) row.push_back(str(b, k));
    }
    t.add(row);
  }
  t.print(std::cout);
  return 0;
}

}  // namespace flotilla::cli
