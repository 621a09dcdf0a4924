// [integration] CLI contexts (flotilla config ...), like a kubeconfig: the
// real CLI against a real hub, with its config file in a scratch
// XDG_CONFIG_HOME. Precedence is flags > environment > context.
#include <sys/stat.h>

#include <catch2/catch.hpp>

#include <regex>

#include "flotilla/common/fs.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

// The CLI with a clean environment for its settings: only what env names.
CliResult flotilla_env(const std::map<std::string, std::string>& env, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"/usr/bin/env", "-u", "FLOTILLA_HUB", "-u", "FLOTILLA_TOKEN", "-u", "FLOTILLA_TOKEN_FILE",
                                   "-u", "FLOTILLA_CONFIG", "-u", "FLOTILLA_CONTEXT", "-u", "FLOTILLA_CA_FILE"};
  for (const auto& [k, v] : env) argv.push_back(k + "=" + v);
  argv.push_back(bin_dir() + "/flotilla");
  argv.insert(argv.end(), args.begin(), args.end());
  auto r = proc::run(argv, std::chrono::seconds(60));
  REQUIRE(r);
  return {r->exit_code, r->out, r->err};
}

std::string slurp(const stdfs::path& p) { return fs::read_file(p, 1 << 20).value_or("<missing>"); }

unsigned mode_of(const stdfs::path& p) {
  struct stat st {};
  REQUIRE(::stat(p.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

}  // namespace

TEST_CASE("CLI contexts: set-context, use-context and get-contexts keep a 0600 file under XDG_CONFIG_HOME",
          "[integration][cli][contexts]") {
  TempDir tmp;
  const std::map<std::string, std::string> env = {{"XDG_CONFIG_HOME", (tmp.path() / "xdg").string()}};
  const auto file = tmp.path() / "xdg/flotilla/config.yaml";

  auto none = flotilla_env(env, {"config", "current-context"});
  CHECK(none.exit_code == 1);
  CHECK(none.err.find("no current context") != std::string::npos);
  CHECK_FALSE(stdfs::exists(file));

  auto a = flotilla_env(env, {"config", "set-context", "lab", "--hub", "http://127.0.0.1:1", "--token-file",
                              (tmp.path() / "lab.token").string()});
  INFO(a.out << a.err);
  REQUIRE(a.exit_code == 0);
  CHECK(mode_of(file) == 0600);
  CHECK(mode_of(file.parent_path()) == 0700);
  // The first context made becomes the current one.
  CHECK(flotilla_env(env, {"config", "current-context"}).out == "lab\n");

  REQUIRE(flotilla_env(env, {"config", "set-context", "prod", "--hub", "https://hub.example:8443"}).exit_code == 0);
  CHECK(flotilla_env(env, {"config", "current-context"}).out == "lab\n");
  REQUIRE(flotilla_env(env, {"config", "use-context", "prod"}).exit_code == 0);
  CHECK(flotilla_env(env, {"config", "current-context"}).out == "prod\n");
  CHECK(mode_of(file) == 0600);

  auto list = flotilla_env(env, {"config", "get-contexts", "-o", "json"});
  REQUIRE(list.exit_code == 0);
  const auto j = json::parse(list.out);
  CHECK(j["current-context"] == "prod");
  REQUIRE(j["contexts"].size() == 2);
  CHECK(j["contexts"][0]["name"] == "lab");
  CHECK(j["contexts"][0]["token-file"] == (tmp.path() / "lab.token").string());
  CHECK(j["contexts"][1]["hub"] == "https://hub.example:8443");
  auto table = flotilla_env(env, {"config", "get-contexts"});
  INFO(table.out);
  CHECK(std::regex_search(table.out, std::regex(R"((^|\n)\*\s+prod\s)")));   // the current one is starred
  CHECK(std::regex_search(table.out, std::regex(R"((^|\n)\s+lab\s)")));       // the other is not

  SECTION("an unknown context or a bad URL is refused and the file is left as it was") {
    const std::string before = slurp(file);
    auto unknown = flotilla_env(env, {"config", "use-context", "nope"});
    CHECK(unknown.exit_code == 1);
    CHECK(unknown.err.find("no context 'nope'") != std::string::npos);
    auto bad = flotilla_env(env, {"config", "set-context", "x", "--hub", "ftp://hub"});
    CHECK(bad.exit_code == 2);
    CHECK(bad.err.find("http:// or https://") != std::string::npos);
    auto badname = flotilla_env(env, {"config", "set-context", "../x"});
    CHECK(badname.exit_code == 2);
    CHECK(slurp(file) == before);
  }
  SECTION("delete-context removes one and unsets it when current") {
    REQUIRE(flotilla_env(env, {"config", "delete-context", "prod"}).exit_code == 0);
    CHECK(flotilla_env(env, {"config", "current-context"}).exit_code == 1);
    CHECK(json::parse(flotilla_env(env, {"config", "get-contexts", "-o", "json"}).out)["contexts"].size() == 1);
  }
}

TEST_CASE("CLI contexts: a malformed or inconsistent config file is a clear error and is never rewritten",
          "[integration][cli][contexts][bad-input]") {
  TempDir tmp;
  const auto file = tmp.path() / "cli.yaml";
  const std::map<std::string, std::string> env = {{"FLOTILLA_CONFIG", file.string()}};
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"contexts: [name: a\n", "line"},
      {"current-context: a\ncontexts:\n  - name: a\n    hub: http://h\n    token: secret\n", "unknown key 'token'"},
      {"current-context: b\ncontexts:\n  - name: a\n", "current-context 'b' is not among the contexts"},
      {"contexts:\n  - name: a\n  - name: a\n", "is there twice"},
      {"contexts:\n  - name: a\n    hub: tcp://h:1\n", "http:// or https://"},
      {"- just\n- a list\n", "must be a map"},
  };
  for (const auto& [text, reason] : cases) {
    INFO(text);
    REQUIRE(fs::write_file_atomic(file, text, 0600));
    for (const std::vector<std::string>& args :
         {std::vector<std::string>{"config", "set-context", "c", "--hub", "http://127.0.0.1:1"},
          std::vector<std::string>{"config", "use-context", "a"}, std::vector<std::string>{"device", "list"}}) {
      auto r = flotilla_env(env, args);
      INFO(args[1] << ": " << r.err);
      CHECK(r.exit_code == (args[0] == "device" ? 2 : 1));  // a hub command: a usage error
      CHECK(r.err.find(file.string()) != std::string::npos);
      CHECK(r.err.find(reason) != std::string::npos);
      CHECK(slurp(file) == text);
    }
  }
}

TEST_CASE("CLI contexts: flags beat the environment, which beats the context, against a real hub",
          "[integration][cli][contexts]") {
  TempDir tmp;
  Hub hub(tmp.path() / "hub");
  hub.start();
  const auto token_file = (hub.data_dir() / "admin.token").string();
  const std::map<std::string, std::string> env = {{"FLOTILLA_CONFIG", (tmp.path() / "cli.yaml").string()}};
  REQUIRE(flotilla_env(env, {"config", "set-context", "real", "--hub", hub.url(), "--token-file", token_file})
              .exit_code == 0);
  REQUIRE(flotilla_env(env, {"config", "set-context", "dead", "--hub", "http://127.0.0.1:1", "--token-file",
                             token_file}).exit_code == 0);
  // "real" is current (the first made): no flags, no environment.
  auto ctx = flotilla_env(env, {"device", "list", "-o", "json"});
  INFO(ctx.err);
  CHECK(ctx.exit_code == 0);

  // The environment beats the context: FLOTILLA_HUB points elsewhere.
  auto env_env = env;
  env_env["FLOTILLA_HUB"] = "http://127.0.0.1:1";
  auto e = flotilla_env(env_env, {"device", "list"});
  CHECK(e.exit_code == 1);
  CHECK(e.err.find("cannot reach the hub at http://127.0.0.1:1") != std::string::npos);
  // A flag beats the environment.
  CHECK(flotilla_env(env_env, {"device", "list", "--hub", hub.url()}).exit_code == 0);
  // A token from the environment beats the context's token file.
  auto bad_token = env;
  bad_token["FLOTILLA_TOKEN"] = "not-a-token";
  auto t = flotilla_env(bad_token, {"device", "list"});
  CHECK(t.exit_code == 1);
  CHECK(t.err.find("401") != std::string::npos);
  // --context / FLOTILLA_CONTEXT pick another context for one command.
  auto other = flotilla_env(env, {"device", "list", "--context", "dead"});
  CHECK(other.err.find("cannot reach the hub at http://127.0.0.1:1") != std::string::npos);
  auto env_ctx = env;
  env_ctx["FLOTILLA_CONTEXT"] = "nope";
  auto missing = flotilla_env(env_ctx, {"device", "list"});
  CHECK(missing.exit_code == 2);
  CHECK(missing.err.find("context 'nope' is not in") != std::string::npos);
}
