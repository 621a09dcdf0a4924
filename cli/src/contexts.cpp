// flotilla config: contexts (a hub URL and a token file per name) kept in a
// small YAML file, kubeconfig style. The file is only ever replaced whole
// (write to a temporary name, rename), and never when it could not be read:
// a malformed file is reported and left exactly as it is.
#include "contexts.hpp"

#include <cstdlib>
#include <iostream>
#include <regex>

#include <yaml-cpp/yaml.h>

#include "cli.hpp"
#include "output.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/options.hpp"

namespace flotilla::cli {

namespace stdfs = std::filesystem;

namespace {
constexpr size_t kMaxConfigBytes = 1 << 20;
constexpr size_t kMaxContexts = 1000;

// Context names end up in tables and shell prompts: keep them plain.
bool valid_name(const std::string& n) {
  static const std::regex re("^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$");
  return std::regex_match(n, re);
}

Status check_hub_url(const std::string& url) {
  if (url.rfind("http://", 0) != 0 && url.rfind("https://", 0) != 0) {
    return make_error(Errc::invalid_argument, "hub must be an http:// or https:// URL, got '" + url + "'");
  }
  return {};
}
}  // namespace

const Context* CliConfig::find(const std::string& name) const {
  for (const auto& c : contexts) {
    if (c.name == name) return &c;
  }
  return nullptr;
}

Result<stdfs::path> cli_config_path() {
  if (const char* f = std::getenv("FLOTILLA_CONFIG"); f && *f) return stdfs::path(f);
  if (const char* x = std::getenv("XDG_CONFIG_HOME"); x && *x == '/') return stdfs::path(x) / "flotilla/config.yaml";
  if (const char* h = std::getenv("HOME"); h && *h) return stdfs::path(h) / ".config/flotilla/config.yaml";
  return make_error(Errc::invalid_argument, "cannot tell where the CLI config is: set FLOTILLA_CONFIG, "
                                            "XDG_CONFIG_HOME or HOME");
}

Result<CliConfig> load_cli_config(const stdfs::path& path) {
  CliConfig c;
  std::error_code ec;
  if (!stdfs::exists(path, ec)) return c;
  auto text = fs::read_file(path, kMaxConfigBytes);
  if (!text) return text.error().with_context("CLI config " + path.string());
  const std::string where = "CLI config " + path.string() + ": ";
  YAML::Node root;
  try {
    root = YAML::Load(*text);
  } catch (const YAML::Exception& e) {
    return make_error(Errc::parse, where + "line " + std::to_string(e.mark.line + 1) + ": " + e.msg);
  }
  if (root.IsNull()) return c;
  if (!root.IsMap()) return make_error(Errc::parse, where + "must be a map with current-context and contexts");
  try {
    for (const auto& kv : root) {
      const auto key = kv.first.as<std::string>();
      if (key == "current-context") {
        c.current = kv.second.as<std::string>();
      } else if (key == "contexts") {
        if (!kv.second.IsSequence()) return make_error(Errc::parse, where + "contexts must be a list");
        if (kv.second.size() > kMaxContexts) return make_error(Errc::parse, where + "more than 1000 contexts");
        for (const auto& item : kv.second) {
          const std::string line = "line " + std::to_string(item.Mark().line + 1) + ": ";
          if (!item.IsMap()) return make_error(Errc::parse, where + line + "a context is a map (name, hub, token-file)");
          Context ctx;
          for (const auto& f : item) {
            const auto k = f.first.as<std::string>();
            const auto v = f.second.as<std::string>();
            if (k == "name") ctx.name = v;
            else if (k == "hub") ctx.hub = v;
            else if (k == "token-file") ctx.token_file = v;
            else if (k == "ca-file") ctx.ca_file = v;
            else return make_error(Errc::parse, where + line + "unknown key '" + k + "' (name, hub, token-file, ca-file)");
          }
          if (!valid_name(ctx.name)) return make_error(Errc::parse, where + line + "a context needs a name (letters, digits, . _ @ -)");
          if (c.find(ctx.name)) return make_error(Errc::parse, where + line + "context '" + ctx.name + "' is there twice");
          if (!ctx.hub.empty()) {
            if (auto s = check_hub_url(ctx.hub); !s) return make_error(Errc::parse, where + line + s.error().message);
          }
          c.contexts.push_back(std::move(ctx));
        }
      } else {
        return make_error(Errc::parse, where + "line " + std::to_string(kv.first.Mark().line + 1) +
                                           ": unknown key '" + key + "' (current-context, contexts)");
      }
    }
  } catch (const YAML::Exception& e) {
    return make_error(Errc::parse, where + "line " + std::to_string(e.mark.line + 1) + ": " + e.msg);
  }
  if (!c.current.empty() && !c.find(c.current)) {
    return make_error(Errc::parse, where + "current-context '" + c.current + "' is not among the contexts");
  }
  return c;
}

Status save_cli_config(const stdfs::path& path, const CliConfig& c) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  out << YAML::Key << "current-context" << YAML::Value << c.current;
  out << YAML::Key << "contexts" << YAML::Value << YAML::BeginSeq;
  for (const auto& ctx : c.contexts) {
    out << YAML::BeginMap << YAML::Key << "name" << YAML::Value << ctx.name;
    if (!ctx.hub.empty()) out << YAML::Key << "hub" << YAML::Value << ctx.hub;
    if (!ctx.token_file.empty()) out << YAML::Key << "token-file" << YAML::Value << ctx.token_file;
    if (!ctx.ca_file.empty()) out << YAML::Key << "ca-file" << YAML::Value << ctx.ca_file;
    out << YAML::EndMap;
  }
  out << YAML::EndSeq << YAML::EndMap;
  std::error_code ec;
  if (path.has_parent_path() && !stdfs::exists(path.parent_path(), ec)) {
    stdfs::create_directories(path.parent_path(), ec);
    if (ec) return make_error(Errc::io, "create " + path.parent_path().string() + ": " + ec.message());
    stdfs::permissions(path.parent_path(), stdfs::perms::owner_all, ec);
  }
  return fs::write_file_atomic(path, std::string(out.c_str()) + "\n", 0600);
}

Result<std::optional<Context>> selected_context(const std::string& name) {
  auto path = cli_config_path();
  if (!path) {
    if (name.empty()) return std::optional<Context>{};  // no HOME and no context asked for: flags only
    return path.error();
  }
  auto cfg = load_cli_config(*path);
  if (!cfg) return cfg.error();
  const std::string want = name.empty() ? cfg->current : name;
  if (want.empty()) return std::optional<Context>{};
  const Context* ctx = cfg->find(want);
  if (!ctx) {
    return make_error(Errc::invalid_argument,
                      "context '" + want + "' is not in " + path->string() + " (flotilla config get-contexts)");
  }
  return std::optional<Context>(*ctx);
}

namespace {

constexpr const char* kConfigUsage =
    "Usage: flotilla config VERB ...\n\n"
    "Contexts: a name for a hub URL and a token file, like kubectl's. The file is\n"
    "$FLOTILLA_CONFIG, else $XDG_CONFIG_HOME/flotilla/config.yaml, else\n"
    "~/.config/flotilla/config.yaml (mode 0600; token files, never tokens).\n"
    "Every hub command uses the current context (or --context NAME /\n"
    "FLOTILLA_CONTEXT) for what its flags and environment (FLOTILLA_HUB,\n"
    "FLOTILLA_TOKEN, FLOTILLA_TOKEN_FILE, FLOTILLA_CA_FILE) leave unset.\n\n"
    "  get-contexts              list the contexts (-o json|yaml)\n"
    "  current-context           print the current context's name\n"
    "  use-context NAME          make NAME the current context\n"
    "  set-context NAME [--hub URL] [--token-file FILE] [--ca-file FILE]\n"
    "                            create NAME or change the fields given\n"
    "  delete-context NAME       remove NAME (and unset it if current)\n";

struct Loaded {
  stdfs::path path;
  CliConfig cfg;
};

Result<Loaded> load() {
  auto path = cli_config_path();
  if (!path) return path.error();
  auto cfg = load_cli_config(*path);
  if (!cfg) return cfg.error();
  return Loaded{*path, *cfg};
}

int get_contexts(int argc, char** argv) {
  Options o("flotilla config get-contexts", "Usage: flotilla config get-contexts [-o table|json|yaml]", "FLOTILLA_");
  o.add("o", kOutputHelp, "table");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  auto l = load();
  if (!l) return fail(l.error().message);
  nlohmann::json j = {{"current-context", l->cfg.current}, {"contexts", nlohmann::json::array()}};
  for (const auto& c : l->cfg.contexts) {
    j["contexts"].push_back({{"name", c.name}, {"hub", c.hub}, {"token-file", c.token_file}, {"ca-file", c.ca_file}});
  }
  if (print_structured(o, j)) return 0;
  Table t({"CURRENT", "NAME", "HUB", "TOKEN-FILE"});
  for (const auto& c : l->cfg.contexts) {
    t.add({c.name == l->cfg.current ? "*" : "", c.name, c.hub.empty() ? "-" : c.hub,
           c.token_file.empty() ? "-" : c.token_file});
  }
  t.print(std::cout);
  return 0;
}

int current_context(int argc, char** argv) {
  Options o("flotilla config current-context", "Usage: flotilla config current-context", "FLOTILLA_");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 0, 0); rc >= 0) return rc;
  auto l = load();
  if (!l) return fail(l.error().message);
  if (l->cfg.current.empty()) return fail("no current context (flotilla config use-context NAME)");
  std::cout << l->cfg.current << "\n";
  return 0;
}

int use_context(int argc, char** argv) {
  Options o("flotilla config use-context", "Usage: flotilla config use-context NAME", "FLOTILLA_");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto l = load();
  if (!l) return fail(l.error().message);
  if (!l->cfg.find(pos[0])) {
    return fail("no context '" + pos[0] + "' in " + l->path.string() + " (flotilla config set-context " + pos[0] +
                " --hub URL --token-file FILE)");
  }
  l->cfg.current = pos[0];
  if (auto s = save_cli_config(l->path, l->cfg); !s) return fail(s.error().message);
  std::cout << "switched to context " << pos[0] << "\n";
  return 0;
}

int set_context(int argc, char** argv) {
  Options o("flotilla config set-context",
            "Usage: flotilla config set-context NAME [--hub URL] [--token-file FILE] [--ca-file FILE]\n\n"
            "Creates context NAME, or changes the fields given. Paths are stored absolute.\n"
            "The first context made becomes the current one.",
            "FLOTILLA_CONTEXT_");
  o.add("hub", "hub REST base URL (http:// or https://)")
      .add("token-file", "file holding the API token")
      .add("ca-file", "PEM CA certificate(s) to verify an https hub against")
      .flag_only("hub")
      .flag_only("token-file")
      .flag_only("ca-file");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  const std::string& name = pos[0];
  if (!valid_name(name)) return fail("context name '" + name + "': letters, digits, . _ @ - (at most 128)", 2);
  if (!o.get("hub").empty()) {
    if (auto s = check_hub_url(o.get("hub")); !s) return fail(s.error().message, 2);
  }
  auto l = load();
  if (!l) return fail(l.error().message);
  auto& cfg = l->cfg;
  Context* ctx = nullptr;
  for (auto& c : cfg.contexts) {
    if (c.name == name) ctx = &c;
  }
  const bool created = ctx == nullptr;
  if (created) {
    if (cfg.contexts.size() >= kMaxContexts) return fail("already 1000 contexts");
    cfg.contexts.push_back(Context{name, "", "", ""});
    ctx = &cfg.contexts.back();
  }
  auto absolute = [](const std::string& p) {
    std::error_code ec;
    auto a = stdfs::absolute(p, ec);
    return ec ? p : a.lexically_normal().string();
  };
  if (!o.get("hub").empty()) ctx->hub = o.get("hub");
  if (!o.get("token-file").empty()) ctx->token_file = absolute(o.get("token-file"));
  if (!o.get("ca-file").empty()) ctx->ca_file = absolute(o.get("ca-file"));
  if (cfg.current.empty()) cfg.current = name;
  if (auto s = save_cli_config(l->path, cfg); !s) return fail(s.error().message);
  std::cout << "context " << name << (created ? " created" : " changed") << " in " << l->path.string() << "\n";
  return 0;
}

int delete_context(int argc, char** argv) {
  Options o("flotilla config delete-context", "Usage: flotilla config delete-context NAME", "FLOTILLA_");
  std::vector<std::string> pos;
  if (int rc = parse_args(o, argc, argv, pos, 1, 1); rc >= 0) return rc;
  auto l = load();
  if (!l) return fail(l.error().message);
  auto& v = l->cfg.contexts;
  const auto before = v.size();
  std::erase_if(v, [&](const Context& c) { return c.name == pos[0]; });
  if (v.size() == before) return fail("no context '" + pos[0] + "' in " + l->path.string());
  if (l->cfg.current == pos[0]) l->cfg.current.clear();
  if (auto s = save_cli_config(l->path, l->cfg); !s) return fail(s.error().message);
  std::cout << "context " << pos[0] << " deleted\n";
  return 0;
}

}  // namespace

int cmd_config(int argc, char** argv) {
  const std::string sub = argc > 1 ? argv[1] : "";
  if (sub == "get-contexts") return get_contexts(argc, argv);
  if (sub == "current-context") return current_context(argc, argv);
  if (sub == "use-context") return use_context(argc, argv);
  if (sub == "set-context") return set_context(argc, argv);
  if (sub == "delete-context") return delete_context(argc, argv);
  if (sub == "--help" || sub == "-h" || sub == "help") {
    std::cout << kConfigUsage;
    return 0;
  }
  std::cerr << kConfigUsage;
  return 2;
}

}  // namespace flotilla::cli
