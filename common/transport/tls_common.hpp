#pragma once
// TLS to a broker, as both transport backends (paho/, loop/) do it: how the
// broker is named and checked, and why a connection failed, in words an
// operator can act on. Internal to common/.
#include <string>

#include "flotilla/common/result.hpp"

typedef struct ssl_st SSL;

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

// What a failed handshake means, from OpenSSL's reasons (why): the broker
// refused this client's certificate (unauthenticated: it needs new
// credentials, not another try); a certificate it does not trust, an alert
// or no protocol version in common (refused: retrying the same handshake
// will not change it); anything else, a connection cut mid-handshake, is the
// network's doing (unavailable, retryable). The message names the URL, and
// the CA file when the broker's certificate did not verify.
Error tls_handshake_error(const std::string& url, const std::string& ca_file, const std::string& why);

// X509_verify_cert_error_string of a verify result, saying so when the
// broker's certificate does not name host.
std::string verify_failure(long verify_result, const std::string& host);

// Names the broker to the session (SNI, for a host name) and, with
// verify_host, has the handshake check that its certificate names host (a
// DNS name or an IP address).
void set_peer_name(SSL* ssl, const std::string& host, bool verify_host);

}  // namespace flotilla::transport::detail
