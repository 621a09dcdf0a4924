#pragma once
// Throwaway PKIs for TLS tests, made with the openssl command line at test
// time: CAs and server certificates for 127.0.0.1 (IP SAN only). P-256 keeps
// key generation fast.
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "flotilla/common/process.hpp"

namespace flotilla::test {

// proc::run does not search PATH.
inline std::string openssl_path() {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  for (size_t start = 0; start <= dirs.size();) {
    const size_t end = std::min(dirs.find(':', start), dirs.size());
    const std::filesystem::path candidate = std::filesystem::path(dirs.substr(start, end - start)) / "openssl";
    if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
    start = end + 1;
  }
  throw std::runtime_error("the openssl command is not installed (scripts/setup.sh installs it)");
}

inline void run_openssl(std::vector<std::string> args) {
  args.insert(args.begin(), openssl_path());
  auto r = proc::run(args, std::chrono::seconds(30));
  if (!r || r->exit_code != 0) {
    throw std::runtime_error("openssl " + args[1] + " failed: " + (r ? r->err : r.error().message));
  }
}

// <dir>/<name>.pem and <name>.key: a self-signed CA.
inline void make_ca(const std::filesystem::path& dir, const std::string& name) {
  run_openssl({"req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
               (dir / (name + ".key")).string(), "-out", (dir / (name + ".pem")).string(), "-days", "2", "-subj",
               "/CN=flotilla test CA " + name, "-addext", "basicConstraints=critical,CA:TRUE", "-addext",
               "keyUsage=critical,keyCertSign"});
}

// <dir>/<name>.pem and <name>.key: a certificate for 127.0.0.1 signed by CA
// <ca>, for the given extended key usages ("serverAuth", "clientAuth" or both).
inline void make_cert(const std::filesystem::path& dir, const std::string& ca, const std::string& name,
                      const std::string& usage) {
  const auto p = [&](const std::string& f) { return (dir / f).string(); };
  std::ofstream(dir / (name + ".cnf")) << "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=" << usage << "\n";
  run_openssl({"req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
               p(name + ".key"), "-out", p(name + ".csr"), "-subj", "/CN=flotilla " + name});
  run_openssl({"x509", "-req", "-in", p(name + ".csr"), "-CA", p(ca + ".pem"), "-CAkey", p(ca + ".key"),
               "-CAcreateserial", "-out", p(name + ".pem"), "-days", "2", "-extfile", p(name + ".cnf")});
}

// <dir>/<name>.pem and <name>.key: a server certificate for 127.0.0.1 signed by CA <ca>.
inline void make_server_cert(const std::filesystem::path& dir, const std::string& ca, const std::string& name) {
  make_cert(dir, ca, name, "serverAuth");
}

}  // namespace flotilla::test
