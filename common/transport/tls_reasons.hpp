#pragma once
// Why a TLS connection to a broker failed, in words an operator can act on:
// shared by the transport backends (paho/, loop/). Internal to common/.
#include <string>

namespace flotilla::transport::detail {

// ERR_print_errors_cb lines, "<thread>:error:0A000086:SSL routines:
// tls_post_process_server_certificate:certificate verify failed:<file>:<line>:"
// -> "certificate verify failed"; several reasons joined with "; ".
std::string openssl_reasons(const std::string& text);

// The reasons in this thread's OpenSSL error queue, as text, emptying it.
std::string drain_ssl_errors();

// The TLS alerts a broker sends about the client's own certificate, as
// OpenSSL names them ("certificate revoked", "unknown ca", ...); "" for any
// other failure.
std::string client_certificate_alert(const std::string& why);

// "TLS handshake with <url> failed: <why>", with a hint naming the CA file
// when the broker's certificate did not verify.
std::string tls_failure_message(const std::string& url, const std::string& ca_file, const std::string& why);

}  // namespace flotilla::transport::detail
