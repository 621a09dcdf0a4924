// See tls_common.hpp.
#include "tls_common.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <vector>

namespace flotilla::transport::detail {

std::string openssl_reasons(const std::string& text) {
  std::string out;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(start, end - start);
    start = end + 1;
    if (line.empty()) continue;
    // Colon-separated after "error:": code, library, function, reason.
    std::vector<std::string> f;
    const size_t at = line.find("error:");
    for (size_t a = at == std::string::npos ? 0 : at;;) {
      const size_t b = line.find(':', a);
      f.push_back(line.substr(a, b == std::string::npos ? std::string::npos : b - a));
      if (b == std::string::npos) break;
      a = b + 1;
    }
    const std::string reason = at != std::string::npos && f.size() > 4 ? f[4] : line;
    if (!reason.empty() && out.find(reason) == std::string::npos) out += (out.empty() ? "" : "; ") + reason;
  }
  return out;
}

std::string client_certificate_alert(const std::string& why) {
  for (const char* alert : {"certificate revoked", "certificate expired", "unknown ca", "bad certificate",
                            "certificate required", "certificate unknown", "unsupported certificate",
                            "access denied"}) {
    if (why.find(std::string("alert ") + alert) != std::string::npos) return alert;
  }
  return {};
}

std::string drain_ssl_errors() {
  std::string out;
  while (const unsigned long e = ERR_get_error()) {
    if (const char* r = ERR_reason_error_string(e)) out += std::string(r) + ";";
  }
  return out;
}

Error tls_handshake_error(const std::string& url, const std::string& ca_file, const std::string& why) {
  if (const std::string alert = client_certificate_alert(why); !alert.empty()) {
    return make_error(Errc::unauthenticated, "the broker refused this client's certificate (" + alert + ")");
  }
  std::string hint;
  if (why.find("certificate verify failed") != std::string::npos) {
    hint = ca_file.empty() ? " (the broker's certificate is not signed by a CA in the system store; pin the "
                             "CA that signed it)"
                           : " (the broker's certificate is not signed by the CA in " + ca_file + ")";
  }
  const std::string message = "TLS handshake with " + url + " failed: " + why + hint;
  const bool rejected = why.find("certificate") != std::string::npos || why.find("alert") != std::string::npos ||
                        why.find("protocol") != std::string::npos ||
                        why.find("wrong version number") != std::string::npos;
  return rejected ? make_error(Errc::refused, message) : make_error(Errc::unavailable, message, true);
}

std::string verify_failure(long verify_result, const std::string& host) {
  std::string why = X509_verify_cert_error_string(verify_result);
  if (why.find("mismatch") != std::string::npos) why += " (the broker's certificate does not name " + host + ")";
  return why;
}

void set_peer_name(SSL* ssl, const std::string& host, bool verify_host) {
  in6_addr ip{};
  const bool is_ip = ::inet_pton(AF_INET, host.c_str(), &ip) == 1 || ::inet_pton(AF_INET6, host.c_str(), &ip) == 1;
  if (!is_ip) SSL_set_tlsext_host_name(ssl, host.c_str());
  if (!verify_host) return;
  X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
  if (is_ip) {
    X509_VERIFY_PARAM_set1_ip_asc(param, host.c_str());
  } else {
    X509_VERIFY_PARAM_set1_host(param, host.c_str(), 0);
  }
}

}  // namespace flotilla::transport::detail
