// See tls_reasons.hpp.
#include "tls_reasons.hpp"

#include <openssl/err.h>

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

std::string tls_failure_message(const std::string& url, const std::string& ca_file, const std::string& why) {
  std::string hint;
  if (why.find("certificate verify failed") != std::string::npos) {
    hint = ca_file.empty() ? " (the broker's certificate is not signed by a CA in the system store; pin the "
                             "CA that signed it)"
                           : " (the broker's certificate is not signed by the CA in " + ca_file + ")";
  }
  return "TLS handshake with " + url + " failed: " + why + hint;
}

}  // namespace flotilla::transport::detail
