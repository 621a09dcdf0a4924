// [unit] tests for common/: errors, encoding, hashing, files, SQLite, options,
// backoff, child processes and the topic layout. No I/O beyond temp dirs.
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/types.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include "tests/support/temp_dir.hpp"
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <algorithm>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "flotilla/common/backoff.hpp"
#include "flotilla/common/crypto.hpp"
#include "flotilla/common/encoding.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/options.hpp"
#include "flotilla/common/process.hpp"
#include "flotilla/common/result.hpp"
#include "flotilla/common/sqlite.hpp"
#include "flotilla/common/transport.hpp"

namespace {

namespace stdfs = std::filesystem;
using namespace std::chrono_literals;
using flotilla::Errc;

using flotilla::test::TempDir;

class UmaskGuard {
 public:
  explicit UmaskGuard(mode_t mask) : old_(::umask(mask)) {}
  ~UmaskGuard() { ::umask(old_); }
  UmaskGuard(const UmaskGuard&) = delete;
  UmaskGuard& operator=(const UmaskGuard&) = delete;

 private:
  mode_t old_;
};

// Sets environment variables for one test and removes them afterwards.
class EnvGuard {
 public:
  EnvGuard() = default;
  ~EnvGuard() {
    for (const auto& n : names_) ::unsetenv(n.c_str());
  }
  EnvGuard(const EnvGuard&) = delete;
  EnvGuard& operator=(const EnvGuard&) = delete;
  void set(const std::string& name, const std::string& value) {
    ::setenv(name.c_str(), value.c_str(), 1);
    names_.push_back(name);
  }

 private:
  std::vector<std::string> names_;
};

// argv for Options::parse; argv[0] is the program name.
class Args {
 public:
  Args(std::initializer_list<std::string> args) : storage_(args) {
    storage_.insert(storage_.begin(), "flotilla-test");
    for (auto& s : storage_) ptrs_.push_back(s.data());
    ptrs_.push_back(nullptr);
  }
  int argc() const { return static_cast<int>(storage_.size()); }
  char** argv() { return ptrs_.data(); }

 private:
  std::vector<std::string> storage_;
  std::vector<char*> ptrs_;
};

void write_text(const stdfs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
  if (!out) throw std::runtime_error("cannot write " + p.string());
}

std::string read_text(const stdfs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

unsigned file_mode(const stdfs::path& p) {
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0) return 0xffffffffu;
  return st.st_mode & 07777;
}

std::set<std::string> dir_entries(const stdfs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : stdfs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

std::string hex_of(const flotilla::crypto::Sha256& h) { return flotilla::to_hex(h.data(), h.size()); }

int64_t count_rows(flotilla::sql::Db& db, const std::string& table) {
  auto st = db.prepare("SELECT COUNT(*) FROM " + table);
  REQUIRE(st.ok());
  auto row = st->step();
  REQUIRE(row.ok());
  REQUIRE(*row);
  return st->col_int(0);
}

flotilla::Status fail_then_propagate(bool fail) {
  auto inner = [fail]() -> flotilla::Status {
    if (fail) return flotilla::make_error(Errc::timeout, "inner failed", true);
    return {};
  };
  FLOTILLA_TRY_STATUS(inner());
  return flotilla::make_error(Errc::internal, "reached the end");
}

}  // namespace

// ---------------------------------------------------------------- Result / Error

TEST_CASE("Result holds either a value or an error", "[unit][common]") {
  flotilla::Result<int> good = 42;
  REQUIRE(good.ok());
  CHECK(static_cast<bool>(good));
  CHECK(*good == 42);
  CHECK(good.value_or(7) == 42);

  flotilla::Result<int> bad = flotilla::make_error(Errc::not_found, "no such device", false);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.error().code == Errc::not_found);
  CHECK(bad.error().message == "no such device");
  CHECK(bad.value_or(7) == 7);

  flotilla::Status ok_status;
  CHECK(ok_status.ok());
  flotilla::Status failed = flotilla::make_error(Errc::io, "disk gone");
  REQUIRE_FALSE(failed.ok());
  CHECK(failed.error().code == Errc::io);
}

TEST_CASE("Error::with_context prefixes the message and keeps code and retryability", "[unit][common]") {
  const flotilla::Error base = flotilla::make_error(Errc::unavailable, "refused", true);
  const flotilla::Error e = base.with_context("enroll").with_context("startup");
  CHECK(e.message == "startup: enroll: refused");
  CHECK(e.code == Errc::unavailable);
  CHECK(e.retryable);
  // The original is a value and stays as it was.
  CHECK(base.message == "refused");
  CHECK(e.describe() == "unavailable: startup: enroll: refused");
  CHECK(flotilla::errc_name(Errc::too_large) == "too_large");
}

TEST_CASE("FLOTILLA_TRY_STATUS returns the inner error unchanged", "[unit][common]") {
  auto failed = fail_then_propagate(true);
  REQUIRE_FALSE(failed.ok());
  CHECK(failed.error().code == Errc::timeout);
  CHECK(failed.error().message == "inner failed");
  CHECK(failed.error().retryable);

  auto passed = fail_then_propagate(false);
  REQUIRE_FALSE(passed.ok());
  CHECK(passed.error().message == "reached the end");
}

// ---------------------------------------------------------------- encoding

TEST_CASE("hex encodes known bytes and round trips", "[unit][common]") {
  const flotilla::Bytes raw = {0x00, 0x01, 0x7f, 0xab, 0xff};
  CHECK(flotilla::to_hex(raw) == "00017fabff");
  CHECK(flotilla::to_hex(std::string_view("abc")) == "616263");

  auto back = flotilla::from_hex("00017fabff");
  REQUIRE(back.has_value());
  CHECK(*back == raw);
  auto upper = flotilla::from_hex("00017FABFF");
  REQUIRE(upper.has_value());
  CHECK(*upper == raw);

  flotilla::Bytes all(256);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint8_t>(i);
  auto round = flotilla::from_hex(flotilla::to_hex(all));
  REQUIRE(round.has_value());
  CHECK(*round == all);

  auto empty = flotilla::from_hex("");
  REQUIRE(empty.has_value());
  CHECK(empty->empty());
}

TEST_CASE("hex decoding rejects odd lengths and non-hex digits", "[unit][common]") {
  CHECK_FALSE(flotilla::from_hex("abc").has_value());
  CHECK_FALSE(flotilla::from_hex("zz").has_value());
  CHECK_FALSE(flotilla::from_hex("0g").has_value());
  CHECK_FALSE(flotilla::from_hex("00 1").has_value());
  CHECK_FALSE(flotilla::from_hex("-1").has_value());
}

TEST_CASE("base64 encodes RFC 4648 vectors and round trips", "[unit][common]") {
  CHECK(flotilla::to_base64(flotilla::to_bytes("")) == "");
  CHECK(flotilla::to_base64(flotilla::to_bytes("f")) == "Zg==");
  CHECK(flotilla::to_base64(flotilla::to_bytes("fo")) == "Zm8=");
  CHECK(flotilla::to_base64(flotilla::to_bytes("foo")) == "Zm9v");
  CHECK(flotilla::to_base64(flotilla::to_bytes("foobar")) == "Zm9vYmFy");

  auto decoded = flotilla::from_base64("Zm9vYmE=");
  REQUIRE(decoded.has_value());
  CHECK(flotilla::to_string(*decoded) == "fooba");

  for (size_t len = 0; len < 70; ++len) {
    flotilla::Bytes raw(len);
    for (size_t i = 0; i < len; ++i) raw[i] = static_cast<uint8_t>(255 - i * 7);
    auto back = flotilla::from_base64(flotilla::to_base64(raw));
    INFO("length " << len);
    REQUIRE(back.has_value());
    CHECK(*back == raw);
  }
}

TEST_CASE("base64 decoding rejects characters outside the alphabet and bad padding", "[unit][common]") {
  CHECK_FALSE(flotilla::from_base64("Zm9v!").has_value());
  CHECK_FALSE(flotilla::from_base64("Zm9v YmFy").has_value());
  CHECK_FALSE(flotilla::from_base64("Zm8").has_value());    // padding required
  CHECK_FALSE(flotilla::from_base64("Zm8==").has_value());  // too much padding
  CHECK_FALSE(flotilla::from_base64("Zm9v_-").has_value());  // URL alphabet is not accepted
}

// ---------------------------------------------------------------- crypto

TEST_CASE("sha256 matches the FIPS 180-2 test vectors", "[unit][common]") {
  CHECK(flotilla::crypto::sha256_hex("abc") ==
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(flotilla::crypto::sha256_hex("") ==
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(flotilla::crypto::sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  CHECK(hex_of(flotilla::crypto::sha256(flotilla::to_bytes("abc"))) ==
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST_CASE("Sha256Stream fed in uneven chunks equals the one-shot hash", "[unit][common]") {
  std::string data;
  for (int i = 0; i < 5000; ++i) data.push_back(static_cast<char>((i * 31 + 7) & 0xff));
  const auto expected = flotilla::crypto::sha256(data);

  flotilla::crypto::Sha256Stream stream;
  const auto* p = reinterpret_cast<const uint8_t*>(data.data());
  size_t off = 0, chunk = 1;
  while (off < data.size()) {
    const size_t n = std::min(chunk, data.size() - off);
    stream.update(p + off, n);
    off += n;
    chunk = chunk * 3 + 1;  // 1, 4, 13, 40, ... crosses every block boundary shape
  }
  CHECK(stream.finish() == expected);

  // A stream over "abc" split in two yields the published digest.
  flotilla::crypto::Sha256Stream abc;
  abc.update(reinterpret_cast<const uint8_t*>("a"), 1);
  abc.update(reinterpret_cast<const uint8_t*>("bc"), 2);
  CHECK(hex_of(abc.finish()) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST_CASE("random tokens are hex of the requested size and differ", "[unit][common]") {
  const auto a = flotilla::crypto::random_token(16);
  const auto b = flotilla::crypto::random_token(16);
  CHECK(a.size() == 32);
  CHECK(flotilla::from_hex(a).has_value());
  CHECK(a != b);
  CHECK(flotilla::crypto::random_bytes(7).size() == 7);
}

TEST_CASE("equal_constant_time compares content and length", "[unit][common]") {
  CHECK(flotilla::crypto::equal_constant_time("secret-token", "secret-token"));
  CHECK_FALSE(flotilla::crypto::equal_constant_time("secret-token", "secret-tokeN"));
  CHECK_FALSE(flotilla::crypto::equal_constant_time("secret", "secret-token"));
  CHECK(flotilla::crypto::equal_constant_time("", ""));
}

// ---------------------------------------------------------------- fs

TEST_CASE("write_file_atomic sets the requested mode even under umask 077", "[unit][common]") {
  TempDir tmp;
  UmaskGuard mask(077);
  const auto a = tmp.path() / "a.conf";
  const auto b = tmp.path() / "b.conf";
  REQUIRE(flotilla::fs::write_file_atomic(a, "alpha", 0644).ok());
  REQUIRE(flotilla::fs::write_file_atomic(b, "beta", 0640).ok());
  CHECK(file_mode(a) == 0644);
  CHECK(file_mode(b) == 0640);
  CHECK(read_text(a) == "alpha");
  CHECK(read_text(b) == "beta");

  // Rewriting with a tighter mode replaces the mode too.
  REQUIRE(flotilla::fs::write_file_atomic(a, "alpha2", 0600).ok());
  CHECK(file_mode(a) == 0600);
  CHECK(read_text(a) == "alpha2");
}

TEST_CASE("write_file_atomic replaces content and leaves no temporary files", "[unit][common]") {
  TempDir tmp;
  const auto target = tmp.path() / "state.json";
  REQUIRE(flotilla::fs::write_file_atomic(target, "{\"v\":1}").ok());
  REQUIRE(flotilla::fs::write_file_atomic(target, "{\"v\":2}").ok());
  std::string big(200000, 'x');
  REQUIRE(flotilla::fs::write_file_atomic(target, big).ok());
  CHECK(read_text(target) == big);
  CHECK(dir_entries(tmp.path()) == std::set<std::string>{"state.json"});
}

TEST_CASE("write_file_atomic that cannot rename fails and changes nothing", "[unit][common]") {
  TempDir tmp;
  // The target is a non-empty directory: rename() must fail.
  const auto target = tmp.path() / "occupied";
  stdfs::create_directory(target);
  write_text(target / "keep.txt", "keep me");

  auto st = flotilla::fs::write_file_atomic(target, "new content");
  REQUIRE_FALSE(st.ok());
  CHECK(st.error().code == Errc::io);
  CHECK_THAT(st.error().message, Catch::Contains(target.string()));
  CHECK(stdfs::is_directory(target));
  CHECK(read_text(target / "keep.txt") == "keep me");
  CHECK(dir_entries(tmp.path()) == std::set<std::string>{"occupied"});
}

TEST_CASE("write_file_atomic into a missing directory fails without creating anything", "[unit][common]") {
  TempDir tmp;
  auto st = flotilla::fs::write_file_atomic(tmp.path() / "missing" / "f.txt", "x");
  REQUIRE_FALSE(st.ok());
  CHECK(st.error().code == Errc::io);
  CHECK(dir_entries(tmp.path()).empty());
}

TEST_CASE("read_file returns content and refuses files above max_bytes", "[unit][common]") {
  TempDir tmp;
  const auto p = tmp.path() / "data.bin";
  std::string content(100000, '\0');
  for (size_t i = 0; i < content.size(); ++i) content[i] = static_cast<char>(i % 251);
  write_text(p, content);

  auto whole = flotilla::fs::read_file(p, content.size());
  REQUIRE(whole.ok());
  CHECK(*whole == content);

  auto refused = flotilla::fs::read_file(p, content.size() - 1);
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.error().code == Errc::too_large);
  CHECK_THAT(refused.error().message, Catch::Contains(std::to_string(content.size() - 1)));
  // Reading never modifies the file.
  CHECK(read_text(p) == content);
}

TEST_CASE("read_file of a missing file is not_found", "[unit][common]") {
  TempDir tmp;
  auto r = flotilla::fs::read_file(tmp.path() / "nope.txt");
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == Errc::not_found);
  CHECK_THAT(r.error().message, Catch::Contains("nope.txt"));
}

TEST_CASE("ensure_dir creates nested directories with the requested mode", "[unit][common]") {
  TempDir tmp;
  UmaskGuard mask(077);
  const auto d = tmp.path() / "a" / "b" / "c";
  REQUIRE(flotilla::fs::ensure_dir(d, 0750).ok());
  CHECK(stdfs::is_directory(d));
  // Every directory it made has the mode, not the umask's.
  CHECK(file_mode(tmp.path() / "a") == 0750);
  CHECK(file_mode(tmp.path() / "a" / "b") == 0750);
  CHECK(file_mode(d) == 0750);
  // Idempotent, and an existing directory keeps its mode.
  REQUIRE(flotilla::fs::ensure_dir(d, 0700).ok());
  CHECK(file_mode(d) == 0750);
  // ensure_own_dir is for the program's own directory: its mode is enforced.
  REQUIRE(flotilla::fs::ensure_own_dir(d, 0700).ok());
  CHECK(file_mode(d) == 0700);
}

TEST_CASE("ensure_dir never changes the mode of a directory that exists (/var/log, /etc)", "[unit][common]") {
  // A system directory with its own mode (the sticky, world-writable /tmp,
  // or a 0750 /var/log): creating a file's parent below it must not touch it.
  TempDir tmp;
  UmaskGuard mask(077);
  const auto varlog = tmp.path() / "var" / "log";
  stdfs::create_directories(varlog);
  ::chmod((tmp.path() / "var").c_str(), 0755);
  ::chmod(varlog.c_str(), 01777);
  REQUIRE(flotilla::fs::ensure_dir(varlog, 0700).ok());
  CHECK(file_mode(varlog) == 01777);
  REQUIRE(flotilla::fs::ensure_dir(varlog / "flotilla" / "x", 0700).ok());
  CHECK(file_mode(varlog) == 01777);
  CHECK(file_mode(tmp.path() / "var") == 0755);
  CHECK(file_mode(varlog / "flotilla") == 0700);
  CHECK(file_mode(varlog / "flotilla" / "x") == 0700);
  // A file where a directory should be is an error naming it; nothing made.
  std::ofstream(tmp.path() / "file") << "x";
  auto bad = flotilla::fs::ensure_dir(tmp.path() / "file" / "sub", 0700);
  REQUIRE_FALSE(bad.ok());
  CHECK_THAT(bad.error().message, Catch::Contains("not a directory"));
  CHECK_FALSE(stdfs::exists(tmp.path() / "file" / "sub"));
}

// ---------------------------------------------------------------- sqlite

TEST_CASE("sql::Db::open creates a WAL database", "[unit][common]") {
  TempDir tmp;
  const auto path = (tmp.path() / "hub.db").string();
  auto db = flotilla::sql::Db::open(path);
  REQUIRE(db.ok());
  CHECK(stdfs::exists(path));

  auto mode = (*db)->prepare("PRAGMA journal_mode");
  REQUIRE(mode.ok());
  auto row = mode->step();
  REQUIRE(row.ok());
  REQUIRE(*row);
  CHECK(mode->col_text(0) == "wal");

  auto fk = (*db)->prepare("PRAGMA foreign_keys");
  REQUIRE(fk.ok());
  REQUIRE(fk->step().value_or(false));
  CHECK(fk->col_int(0) == 1);

  REQUIRE((*db)->exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)").ok());
  CHECK(stdfs::exists(path + "-wal"));
}

TEST_CASE("sql::Transaction rolls back unless committed", "[unit][common]") {
  TempDir tmp;
  auto opened = flotilla::sql::Db::open((tmp.path() / "t.db").string());
  REQUIRE(opened.ok());
  auto& db = **opened;
  REQUIRE(db.exec("CREATE TABLE devices (id TEXT PRIMARY KEY, site TEXT)").ok());

  {
    flotilla::sql::Transaction tx(db);
    REQUIRE(tx.ok());
    auto ins = db.prepare("INSERT INTO devices (id, site) VALUES (?, ?)");
    REQUIRE(ins.ok());
    REQUIRE(ins->bind(1, std::string_view("dev-1")).bind(2, std::string_view("berlin")).run().ok());
    CHECK(count_rows(db, "devices") == 1);  // visible inside the transaction
  }  // not committed
  CHECK(count_rows(db, "devices") == 0);

  {
    flotilla::sql::Transaction tx(db);
    REQUIRE(tx.ok());
    auto ins = db.prepare("INSERT INTO devices (id, site) VALUES (?, ?)");
    REQUIRE(ins.ok());
    REQUIRE(ins->bind(1, std::string_view("dev-2")).bind(2, std::string_view("paris")).run().ok());
    REQUIRE(tx.commit().ok());
  }
  CHECK(count_rows(db, "devices") == 1);
  auto sel = db.prepare("SELECT id, site FROM devices");
  REQUIRE(sel.ok());
  REQUIRE(sel->step().value_or(false));
  CHECK(sel->col_text(0) == "dev-2");
  CHECK(sel->col_text(1) == "paris");

  // A second connection (another process in production) sees the committed row.
  auto other = flotilla::sql::Db::open((tmp.path() / "t.db").string());
  REQUIRE(other.ok());
  CHECK(count_rows(**other, "devices") == 1);
}

TEST_CASE("sql errors map constraint violations to conflict and leave the data", "[unit][common]") {
  TempDir tmp;
  auto opened = flotilla::sql::Db::open((tmp.path() / "c.db").string());
  REQUIRE(opened.ok());
  auto& db = **opened;
  REQUIRE(db.exec("CREATE TABLE k (id TEXT PRIMARY KEY); INSERT INTO k VALUES ('a')").ok());

  auto dup = db.exec("INSERT INTO k VALUES ('a')");
  REQUIRE_FALSE(dup.ok());
  CHECK(dup.error().code == Errc::conflict);
  CHECK(count_rows(db, "k") == 1);

  auto bad = db.prepare("SELEKT nonsense");
  REQUIRE_FALSE(bad.ok());
  CHECK_THAT(bad.error().message, Catch::Contains("prepare"));
}

TEST_CASE("sql::Stmt binds null, blobs and reads them back", "[unit][common]") {
  TempDir tmp;
  auto opened = flotilla::sql::Db::open((tmp.path() / "b.db").string());
  REQUIRE(opened.ok());
  auto& db = **opened;
  REQUIRE(db.exec("CREATE TABLE x (a BLOB, b TEXT, n INTEGER)").ok());
  const std::string blob("\x00\x01\xff zero", 8);
  auto ins = db.prepare("INSERT INTO x VALUES (?, ?, ?)");
  REQUIRE(ins.ok());
  REQUIRE(ins->bind_blob(1, blob).bind(2, std::optional<std::string>()).bind(3, int64_t{1} << 40).run().ok());
  CHECK(db.changes() == 1);

  auto sel = db.prepare("SELECT a, b, n FROM x");
  REQUIRE(sel.ok());
  REQUIRE(sel->step().value_or(false));
  CHECK(sel->col_blob(0) == blob);
  CHECK(sel->col_is_null(1));
  CHECK(sel->col_int(2) == (int64_t{1} << 40));
  auto end = sel->step();
  REQUIRE(end.ok());
  CHECK_FALSE(*end);
}

// ---------------------------------------------------------------- options

TEST_CASE("Options precedence is flag > env > file > default", "[unit][common]") {
  TempDir tmp;
  EnvGuard env;
  const auto cfg = tmp.path() / "agent.yaml";
  write_text(cfg,
             "alpha: from-file\n"
             "beta: from-file\n"
             "gamma: from-file\n");
  env.set("FLOTILLA_UT_PREC_ALPHA", "from-env");
  env.set("FLOTILLA_UT_PREC_BETA", "from-env");

  flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_PREC_");
  o.add("config", "config file").add("alpha", "a", "from-default").add("beta", "b", "from-default")
      .add("gamma", "c", "from-default").add("delta", "d", "from-default").config_file_key("config");
  Args args{"--alpha", "from-flag", "--config", cfg.string()};
  auto r = o.parse(args.argc(), args.argv());
  REQUIRE(r.ok());
  CHECK(r->empty());
  CHECK(o.get("alpha") == "from-flag");
  CHECK(o.get("beta") == "from-env");
  CHECK(o.get("gamma") == "from-file");
  CHECK(o.get("delta") == "from-default");
  CHECK(o.source("alpha") == "flag");
  CHECK(o.source("beta") == "env");
  CHECK(o.source("gamma") == "file");
  CHECK(o.source("delta") == "default");
}

TEST_CASE("Options env names upper-case the key and turn dashes into underscores", "[unit][common]") {
  EnvGuard env;
  env.set("FLOTILLA_UT_ENV_DATA_DIR", "/var/lib/x");
  env.set("FLOTILLA_UT_ENV_TAG", "a,b,,c");
  flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_ENV_");
  o.add("data-dir", "d").add_list("tag", "t");
  Args args{};
  REQUIRE(o.parse(args.argc(), args.argv()).ok());
  CHECK(o.get("data-dir") == "/var/lib/x");
  CHECK(o.get_list("tag") == std::vector<std::string>{"a", "b", "c"});
  CHECK_THAT(o.help(), Catch::Contains("FLOTILLA_UT_ENV_DATA_DIR"));
}

TEST_CASE("Options unknown flag is an error naming the flag", "[unit][common]") {
  flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_UNK_");
  o.add("known", "k", "kept");
  Args args{"--known=changed", "--bogus-flag", "x"};
  auto r = o.parse(args.argc(), args.argv());
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == Errc::invalid_argument);
  CHECK_THAT(r.error().message, Catch::Contains("--bogus-flag"));
}

TEST_CASE("Options unknown config-file key is an error naming the key and line", "[unit][common]") {
  TempDir tmp;
  const auto cfg = tmp.path() / "c.yaml";
  write_text(cfg,
             "# comment\n"
             "name: edge\n"
             "colour: red\n");
  flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_KEY_");
  o.add("config", "c").add("name", "n", "default-name").config_file_key("config");
  Args args{"--config", cfg.string()};
  auto r = o.parse(args.argc(), args.argv());
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == Errc::invalid_argument);
  CHECK_THAT(r.error().message, Catch::Contains("'colour'"));
  CHECK_THAT(r.error().message, Catch::Contains("line 3"));
  CHECK_THAT(r.error().message, Catch::Contains(cfg.string()));
}

TEST_CASE("Options config-file keys may use underscores for dashes", "[unit][common]") {
  TempDir tmp;
  const auto cfg = tmp.path() / "c.yaml";
  write_text(cfg, "data_dir: /srv/flotilla\n");
  flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_US_");
  o.add("config", "c").add("data-dir", "d", "/default").config_file_key("config");
  Args args{"--config=" + cfg.string()};
  REQUIRE(o.parse(args.argc(), args.argv()).ok());
  CHECK(o.get("data-dir") == "/srv/flotilla");
  CHECK(o.source("data-dir") == "file");
}

TEST_CASE("Options non-scalar value for a single-value key names the key", "[unit][common]") {
  TempDir tmp;
  const auto cfg = tmp.path() / "c.yaml";
  write_text(cfg, "name:\n  - a\n  - b\n");
  flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_NS_");
  o.add("config", "c").add("name", "n", "default-name").config_file_key("config");
  Args args{"--config", cfg.string()};
  auto r = o.parse(args.argc(), args.argv());
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.error().message, Catch::Contains("'name'"));
  CHECK(o.get("name") == "default-name");
}

TEST_CASE("Options explicitly named missing config file is an error, a default one is not", "[unit][common]") {
  TempDir tmp;
  const auto missing = (tmp.path() / "absent.yaml").string();

  SECTION("named by flag") {
    flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_MISS_");
    o.add("config", "c", "").add("name", "n", "dflt").config_file_key("config");
    Args args{"--config", missing};
    auto r = o.parse(args.argc(), args.argv());
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == Errc::not_found);
    CHECK_THAT(r.error().message, Catch::Contains("absent.yaml"));
  }
  SECTION("named by environment") {
    EnvGuard env;
    env.set("FLOTILLA_UT_MISS_CONFIG", missing);
    flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_MISS_");
    o.add("config", "c", "").add("name", "n", "dflt").config_file_key("config");
    Args args{};
    auto r = o.parse(args.argc(), args.argv());
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == Errc::not_found);
  }
  SECTION("default location absent") {
    flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_MISS_");
    o.add("config", "c", missing).add("name", "n", "dflt").config_file_key("config");
    Args args{"--name", "given"};
    auto r = o.parse(args.argc(), args.argv());
    REQUIRE(r.ok());
    CHECK(o.get("name") == "given");
    CHECK(o.source("config") == "default");
  }
}

TEST_CASE("Options malformed YAML config is a parse error", "[unit][common]") {
  TempDir tmp;
  const auto cfg = tmp.path() / "bad.yaml";
  write_text(cfg, "name: [unclosed\n");
  flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_BADY_");
  o.add("config", "c").add("name", "n", "dflt").config_file_key("config");
  Args args{"--config", cfg.string()};
  auto r = o.parse(args.argc(), args.argv());
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == Errc::parse);
  CHECK(o.get("name") == "dflt");
}

TEST_CASE("Options get_int checks range and whole numbers", "[unit][common]") {
  flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_INT_");
  o.add("port", "p", "8080").add("workers", "w", "4");
  Args args{"--port", "70000", "--workers", "4x"};
  REQUIRE(o.parse(args.argc(), args.argv()).ok());

  auto port = o.get_int("port", 1, 65535);
  REQUIRE_FALSE(port.ok());
  CHECK(port.error().code == Errc::invalid_argument);
  CHECK(port.error().message == "port must be between 1 and 65535, got 70000");

  auto workers = o.get_int("workers", 1, 64);
  REQUIRE_FALSE(workers.ok());
  CHECK_THAT(workers.error().message, Catch::Contains("whole number"));
  CHECK_THAT(workers.error().message, Catch::Contains("'4x'"));
  CHECK_THAT(workers.error().message, Catch::Contains("flag"));

  flotilla::Options ok("flotilla-test", "test", "FLOTILLA_UT_INT2_");
  ok.add("port", "p", "65535");
  Args none{};
  REQUIRE(ok.parse(none.argc(), none.argv()).ok());
  auto in_range = ok.get_int("port", 1, 65535);
  REQUIRE(in_range.ok());
  CHECK(*in_range == 65535);
}

TEST_CASE("parse_duration understands ms, s, m, h and d", "[unit][common]") {
  auto ms = [](const std::string& text) {
    auto d = flotilla::parse_duration(text);
    INFO(text);
    REQUIRE(d.ok());
    return d->count();
  };
  CHECK(ms("500ms") == 500);
  CHECK(ms("30s") == 30'000);
  CHECK(ms("5m") == 300'000);
  CHECK(ms("2h") == 7'200'000);
  CHECK(ms("7d") == 604'800'000);
  CHECK(ms("1.5s") == 1'500);
  CHECK(ms("45") == 45'000);  // a bare number is seconds
}

TEST_CASE("parse_duration rejects unknown units and missing numbers", "[unit][common]") {
  auto bad_unit = flotilla::parse_duration("5w");
  REQUIRE_FALSE(bad_unit.ok());
  CHECK(bad_unit.error().code == Errc::invalid_argument);
  CHECK_THAT(bad_unit.error().message, Catch::Contains("unknown unit 'w'"));

  CHECK_FALSE(flotilla::parse_duration("").ok());
  CHECK_FALSE(flotilla::parse_duration("s").ok());
  CHECK_FALSE(flotilla::parse_duration("-5s").ok());
  CHECK_FALSE(flotilla::parse_duration("5 s").ok());
}

TEST_CASE("parse_duration rejects malformed numbers with an error instead of throwing",
          "[unit][common]") {
  // Bug: parse_duration hands the digits-and-dots prefix to std::stod, which
  // throws std::invalid_argument for "." and silently ignores the rest of "1.2.3".
  CHECK_NOTHROW(flotilla::parse_duration("."));
  CHECK_NOTHROW(flotilla::parse_duration(".s"));
  bool dot_rejected = false;
  try {
    dot_rejected = !flotilla::parse_duration(".s").ok();
  } catch (const std::exception&) {
  }
  CHECK(dot_rejected);
  CHECK_FALSE(flotilla::parse_duration("1.2.3s").ok());
}

TEST_CASE("Options get_duration names the key in its error", "[unit][common]") {
  flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_DUR_");
  o.add("interval", "i", "30s").add("timeout", "t", "10s");
  Args args{"--timeout", "3 fortnights"};
  REQUIRE(o.parse(args.argc(), args.argv()).ok());
  auto interval = o.get_duration("interval");
  REQUIRE(interval.ok());
  CHECK(*interval == 30s);
  auto timeout = o.get_duration("timeout");
  REQUIRE_FALSE(timeout.ok());
  CHECK_THAT(timeout.error().message, Catch::StartsWith("timeout: "));
}

TEST_CASE("Options list from a YAML map becomes k=v entries", "[unit][common]") {
  TempDir tmp;
  const auto cfg = tmp.path() / "c.yaml";
  write_text(cfg,
             "labels:\n"
             "  site: berlin\n"
             "  tier: edge\n"
             "root-keys:\n"
             "  - ed25519:AAAA\n"
             "  - ed25519:BBBB\n");
  flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_LIST_");
  o.add("config", "c").add_list("labels", "l").add_list("root-keys", "r").config_file_key("config");
  Args args{"--config", cfg.string()};
  REQUIRE(o.parse(args.argc(), args.argv()).ok());
  CHECK(o.get_list("labels") == std::vector<std::string>{"site=berlin", "tier=edge"});
  CHECK(o.get_list("root-keys") == std::vector<std::string>{"ed25519:AAAA", "ed25519:BBBB"});
  auto m = o.get_map("labels");
  REQUIRE(m.ok());
  CHECK(*m == std::map<std::string, std::string>{{"site", "berlin"}, {"tier", "edge"}});
}

TEST_CASE("Options repeated list flags replace lower-precedence values", "[unit][common]") {
  EnvGuard env;
  env.set("FLOTILLA_UT_REP_LABEL", "from=env");
  flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_REP_");
  o.add_list("label", "l");
  Args args{"--label", "a=1", "--label=b=2", "positional", "--", "--not-a-flag"};
  auto r = o.parse(args.argc(), args.argv());
  REQUIRE(r.ok());
  CHECK(o.get_list("label") == std::vector<std::string>{"a=1", "b=2"});
  CHECK(*r == std::vector<std::string>{"positional", "--not-a-flag"});
}

TEST_CASE("Options get_map refuses entries without a key", "[unit][common]") {
  flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_MAP_");
  o.add_list("label", "l");
  Args args{"--label", "good=1", "--label", "=nokey"};
  REQUIRE(o.parse(args.argc(), args.argv()).ok());
  auto m = o.get_map("label");
  REQUIRE_FALSE(m.ok());
  CHECK_THAT(m.error().message, Catch::Contains("'=nokey'"));
}

TEST_CASE("Options: a confirmation switch comes from the command line only", "[unit][common]") {
  // FLOTILLA_YES=true exported in a shell, or `yes: true` left in a file,
  // must never confirm a decommission (or a key overwrite) for the operator.
  TempDir tmp;
  EnvGuard env;
  env.set("FLOTILLA_UT_CONF_YES", "true");
  env.set("FLOTILLA_UT_CONF_NAME", "from-env");
  auto options = [] {
    flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_CONF_");
    o.add("config", "c").add_switch("yes", "confirm").flag_only("yes").add("name", "n").config_file_key("config");
    return o;
  };
  {
    auto o = options();
    Args args{};
    REQUIRE(o.parse(args.argc(), args.argv()).ok());
    CHECK_FALSE(o.get_bool("yes"));
    CHECK(o.source("yes") == "default");
    CHECK(o.get("name") == "from-env");  // other options still read the environment
    CHECK_THAT(o.help(), Catch::Contains("command line only"));
  }
  {
    const auto cfg = tmp.path() / "c.yaml";
    std::ofstream(cfg) << "name: x\nyes: true\n";
    auto o = options();
    Args args{"--config", cfg.string()};
    auto r = o.parse(args.argc(), args.argv());
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.error().message, Catch::Contains("'yes' can only be given on the command line"));
    CHECK_FALSE(o.get_bool("yes"));
  }
  {
    auto o = options();
    Args args{"--yes"};
    REQUIRE(o.parse(args.argc(), args.argv()).ok());
    CHECK(o.get_bool("yes"));
    CHECK(o.source("yes") == "flag");
  }
}

TEST_CASE("Options switches take no value and refuse non-booleans", "[unit][common]") {
  flotilla::Options o("flotilla-test", "test", "FLOTILLA_UT_SW_");
  o.add_switch("ci", "c").add_switch("verbose", "v").add("name", "n", "x");
  Args args{"--ci", "--name", "y"};
  REQUIRE(o.parse(args.argc(), args.argv()).ok());
  CHECK(o.get_bool("ci"));
  CHECK_FALSE(o.get_bool("verbose"));
  CHECK(o.get("name") == "y");

  flotilla::Options bad("flotilla-test", "test", "FLOTILLA_UT_SW_");
  bad.add_switch("ci", "c");
  Args bad_args{"--ci=maybe"};
  auto r = bad.parse(bad_args.argc(), bad_args.argv());
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.error().message, Catch::Contains("maybe"));

  flotilla::Options missing("flotilla-test", "test", "FLOTILLA_UT_SW_");
  missing.add("name", "n", "x");
  Args missing_args{"--name"};
  auto m = missing.parse(missing_args.argc(), missing_args.argv());
  REQUIRE_FALSE(m.ok());
  CHECK_THAT(m.error().message, Catch::Contains("--name needs a value"));
  CHECK(missing.get("name") == "x");
}

// ---------------------------------------------------------------- backoff

TEST_CASE("Backoff ceiling doubles from the base, then caps", "[unit][common]") {
  flotilla::Backoff b(100ms, 1000ms, 1);
  std::vector<int64_t> ceilings;
  for (int i = 0; i < 7; ++i) {
    ceilings.push_back(b.ceiling_ms());
    (void)b.next();
  }
  CHECK(ceilings == std::vector<int64_t>{100, 200, 400, 800, 1000, 1000, 1000});
  CHECK(b.attempt() == 7);
}

TEST_CASE("Backoff delays never exceed the ceiling or the cap", "[unit][common]") {
  flotilla::Backoff b(50ms, 3000ms, 12345);
  bool saw_nonzero = false;
  for (int i = 0; i < 500; ++i) {
    const int64_t ceiling = b.ceiling_ms();
    const auto d = b.next();
    INFO("attempt " << i);
    REQUIRE(d.count() >= 0);
    REQUIRE(d.count() <= ceiling);
    REQUIRE(d.count() <= 3000);
    saw_nonzero |= d.count() > 0;
  }
  CHECK(saw_nonzero);
  CHECK(b.ceiling_ms() == 3000);
}

TEST_CASE("Backoff with different seeds gives different sequences, same seed repeats", "[unit][common]") {
  auto sequence = [](uint64_t seed) {
    flotilla::Backoff b(1000ms, 60000ms, seed);
    std::vector<int64_t> out;
    for (int i = 0; i < 20; ++i) out.push_back(b.next().count());
    return out;
  };
  CHECK(sequence(1) != sequence(2));
  CHECK(sequence(42) == sequence(42));
}

TEST_CASE("Backoff reset returns to the base ceiling", "[unit][common]") {
  flotilla::Backoff b(100ms, 10000ms, 7);
  for (int i = 0; i < 5; ++i) (void)b.next();
  REQUIRE(b.ceiling_ms() == 3200);
  b.reset();
  CHECK(b.attempt() == 0);
  CHECK(b.ceiling_ms() == 100);
  CHECK(b.next().count() <= 100);
  CHECK(b.ceiling_ms() == 200);
}

// ---------------------------------------------------------------- process

TEST_CASE("proc::run captures stdout, stderr and the exit code", "[unit][common]") {
  auto r = flotilla::proc::run({"/bin/sh", "-c", "echo hello; echo oops >&2; exit 3"}, 10s);
  REQUIRE(r.ok());
  CHECK(r->out == "hello\n");
  CHECK(r->err == "oops\n");
  CHECK(r->exit_code == 3);
  CHECK_FALSE(r->timed_out);

  auto zero = flotilla::proc::run({"/bin/sh", "-c", "printf '%s' \"$0\"", "arg0"}, 10s);
  REQUIRE(zero.ok());
  CHECK(zero->exit_code == 0);
  CHECK(zero->out == "arg0");
}

TEST_CASE("proc::run reports a child killed by a signal as 128+signal", "[unit][common]") {
  auto r = flotilla::proc::run({"/bin/sh", "-c", "kill -9 $$"}, 10s);
  REQUIRE(r.ok());
  CHECK(r->exit_code == 128 + 9);
  CHECK_FALSE(r->timed_out);
}

TEST_CASE("proc::run caps captured output", "[unit][common]") {
  auto r = flotilla::proc::run({"/bin/sh", "-c", "i=0; while [ $i -lt 200 ]; do echo 0123456789; i=$((i+1)); done"},
                               10s, 100);
  REQUIRE(r.ok());
  CHECK(r->exit_code == 0);
  CHECK(r->out.size() == 100);
  CHECK(r->out.substr(0, 11) == "0123456789\n");
}

TEST_CASE("proc::run times out a long child and reports timed_out", "[unit][common]") {
  const auto start = std::chrono::steady_clock::now();
  auto r = flotilla::proc::run({"/bin/sh", "-c", "sleep 5"}, 200ms);
  const auto elapsed = std::chrono::steady_clock::now() - start;
  REQUIRE(r.ok());
  CHECK(r->timed_out);
  CHECK(r->exit_code != 0);
  // Not a speed target: without the timeout run() would wait the full 5 s.
  CHECK(elapsed < 4s);
}

TEST_CASE("proc::run closes its pipes when fork fails", "[unit][common]") {
  // fork fails with EAGAIN once a user is at its process limit. Root is exempt
  // from RLIMIT_NPROC, so a child of this test drops to nobody first; it then
  // runs proc::run many times and exits 0 only if every call failed at fork
  // and no descriptor was left behind.
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    if (::geteuid() == 0 && (::setgid(65534) != 0 || ::setuid(65534) != 0)) ::_exit(10);
    const rlimit none{0, 0};
    if (::setrlimit(RLIMIT_NPROC, &none) != 0) ::_exit(11);
    auto open_fds = [] {
      int n = 0;
      for (int fd = 0; fd < 4096; ++fd) n += ::fcntl(fd, F_GETFD) != -1 ? 1 : 0;
      return n;
    };
    const int before = open_fds();
    for (int i = 0; i < 50; ++i) {
      auto r = flotilla::proc::run({"/bin/true"}, 1s);
      if (r.ok()) ::_exit(12);  // fork was not refused: the rig does not test anything
      if (r.error().message.rfind("fork:", 0) != 0) ::_exit(13);
    }
    ::_exit(open_fds() == before ? 0 : 14);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  INFO("child exit code (12: fork not refused, 13: another error, 14: descriptors leaked)");
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("proc spawn and run of a missing binary give not_found", "[unit][common]") {
  TempDir tmp;
  const auto missing = (tmp.path() / "no-such-binary").string();
  flotilla::proc::SpawnOptions so;
  so.argv = {missing};
  auto child = flotilla::proc::spawn(so);
  REQUIRE_FALSE(child.ok());
  CHECK(child.error().code == Errc::not_found);
  CHECK_THAT(child.error().message, Catch::Contains("no-such-binary"));

  auto ran = flotilla::proc::run({missing}, 1s);
  REQUIRE_FALSE(ran.ok());
  CHECK(ran.error().code == Errc::not_found);

  flotilla::proc::SpawnOptions empty;
  auto e = flotilla::proc::spawn(empty);
  REQUIRE_FALSE(e.ok());
  CHECK(e.error().code == Errc::invalid_argument);
}

TEST_CASE("proc::spawn passes env and redirects output, wait_for returns the exit code", "[unit][common]") {
  TempDir tmp;
  const auto out = tmp.path() / "out.log";
  flotilla::proc::SpawnOptions so;
  so.argv = {"/bin/sh", "-c", "echo \"$FLOTILLA_UT_SPAWN_VAR\"; echo to-err >&2; pwd; exit 4"};
  so.env_set = {{"FLOTILLA_UT_SPAWN_VAR", "value-42"}};
  so.stdout_path = out.string();
  so.stderr_path = "stdout";
  so.cwd = tmp.path().string();
  auto child = flotilla::proc::spawn(so);
  REQUIRE(child.ok());
  auto code = child->wait_for(10s);
  REQUIRE(code.has_value());
  CHECK(*code == 4);
  const auto text = read_text(out);
  CHECK_THAT(text, Catch::Contains("value-42\n"));
  CHECK_THAT(text, Catch::Contains("to-err\n"));
  CHECK_THAT(text, Catch::Contains(stdfs::canonical(tmp.path()).string()));
  CHECK_FALSE(flotilla::proc::alive(child->pid()));
}

TEST_CASE("proc::spawn refuses when the output file or the directory cannot be opened, and runs nothing",
          "[unit][common]") {
  TempDir tmp;
  const auto ran = tmp.path() / "ran";
  flotilla::proc::SpawnOptions so;
  so.argv = {"/bin/sh", "-c", "touch " + ran.string()};
  so.stdout_path = (tmp.path() / "missing-dir" / "out.log").string();
  so.stderr_path = "stdout";
  auto child = flotilla::proc::spawn(so);
  REQUIRE_FALSE(child.ok());
  CHECK(child.error().code == Errc::io);
  CHECK_THAT(child.error().message, Catch::Contains("missing-dir/out.log"));
  CHECK_THAT(child.error().message, Catch::Contains("No such file or directory"));

  so.stdout_path.clear();
  so.stderr_path = (tmp.path() / "missing-dir" / "err.log").string();
  child = flotilla::proc::spawn(so);
  REQUIRE_FALSE(child.ok());
  CHECK_THAT(child.error().message, Catch::Contains("error output file"));

  so.stderr_path.clear();
  so.cwd = (tmp.path() / "missing-dir").string();
  child = flotilla::proc::spawn(so);
  REQUIRE_FALSE(child.ok());
  CHECK_THAT(child.error().message, Catch::Contains("cannot change to directory"));
  CHECK_FALSE(stdfs::exists(ran));  // the command never ran
}

TEST_CASE("proc::Child::terminate stops a running child", "[unit][common]") {
  flotilla::proc::SpawnOptions so;
  so.argv = {"/bin/sleep", "30"};
  auto child = flotilla::proc::spawn(so);
  REQUIRE(child.ok());
  REQUIRE_FALSE(child->poll().has_value());
  child->terminate(5s);
  auto code = child->poll();
  REQUIRE(code.has_value());
  CHECK(*code == 128 + 15);
}

// ---------------------------------------------------------------- transport topics

TEST_CASE("device_id_from_topic extracts the id and leaf", "[unit][common]") {
  using flotilla::transport::device_id_from_topic;
  std::string leaf;
  CHECK(device_id_from_topic("flotilla/v1/d/dev-42/state", &leaf) == "dev-42");
  CHECK(leaf == "state");
  CHECK(device_id_from_topic("flotilla/v1/d/dev-42/report/extra", &leaf) == "dev-42");
  CHECK(leaf == "report/extra");
  CHECK(device_id_from_topic(flotilla::transport::device_topic("abc", "desired")) == "abc");

  leaf = "unchanged";
  CHECK(device_id_from_topic("flotilla/v1/d/dev-42", &leaf).empty());       // no leaf
  CHECK(device_id_from_topic("flotilla/v1/d//state", &leaf).empty());       // empty id
  CHECK(device_id_from_topic("flotilla/v2/d/dev-42/state", &leaf).empty());  // other version
  CHECK(device_id_from_topic("x/flotilla/v1/d/dev-42/state", &leaf).empty());
  CHECK(device_id_from_topic("flotilla/v1/d/", &leaf).empty());
  CHECK(device_id_from_topic("", &leaf).empty());
  CHECK(leaf == "unchanged");
}

TEST_CASE("roll call shards: fixed by the client id alone, spread over all 256, and told apart from other topics",
          "[unit][common]") {
  using namespace flotilla::transport;
  // Pinned values: the hub and agents of every version must agree on them.
  CHECK(rollcall_topic("d-1") == "flotilla/v1/rollcall/91");
  CHECK(rollcall_topic("flotilla-hub") == "flotilla/v1/rollcall/6c");
  CHECK(rollcall_shard_topic(0) == "flotilla/v1/rollcall/00");
  CHECK(rollcall_shard_topic(255) == "flotilla/v1/rollcall/ff");
  std::set<std::string> shards;
  for (int i = 0; i < 20000; ++i) shards.insert(rollcall_topic("d-" + std::to_string(i)));
  CHECK(shards.size() == 256);
  for (int shard = 0; shard < kRollcallShards; ++shard) CHECK(is_rollcall_topic(rollcall_shard_topic(shard)));
  CHECK(is_rollcall_topic(kRollcallTopic));
  for (const char* other : {"flotilla/v1/rollcall/", "flotilla/v1/rollcall/0", "flotilla/v1/rollcall/0g",
                            "flotilla/v1/rollcall/abc", "flotilla/v1/rollcallx", "flotilla/v1/rollcall/00/x",
                            "flotilla/v1/d/d-1/desired", ""}) {
    CHECK_FALSE(is_rollcall_topic(other));
  }
}

TEST_CASE("gateway_of_reports_topic takes exactly flotilla/v1/g/<id>/reports", "[unit][common]") {
  using flotilla::transport::gateway_of_reports_topic;
  CHECK(gateway_of_reports_topic(flotilla::transport::gateway_reports_topic("gw-1")) == "gw-1");
  CHECK(gateway_of_reports_topic("flotilla/v1/g/gw-1/reports") == "gw-1");
  CHECK(gateway_of_reports_topic("flotilla/v1/g//reports").empty());             // empty id
  CHECK(gateway_of_reports_topic("flotilla/v1/g/gw-1/d/x/reports").empty());     // a device's subtree
  CHECK(gateway_of_reports_topic("flotilla/v1/g/gw-1/d/x/report").empty());
  CHECK(gateway_of_reports_topic("flotilla/v1/d/gw-1/reports").empty());         // not a gateway topic
  CHECK(gateway_of_reports_topic("flotilla/v1/g/gw-1/reports/x").empty());
  CHECK(gateway_of_reports_topic("flotilla/v1/g/reports").empty());
}
