#pragma once
// Certificate and key files of the hub's TLS listeners (the REST API and the
// embedded broker), checked the same way so a bad file gets the same clear
// message whichever setting named it.
#include <string>

#include "flotilla/common/result.hpp"

typedef struct ssl_ctx_st SSL_CTX;

namespace flotilla::hub {

// The oldest queued OpenSSL error as text (the queue is cleared).
std::string openssl_error();
// Loads a PEM certificate chain and its private key into ctx. Errors name the
// setting (cert_key, key_key) and the file: unreadable, not PEM, or a key that
// does not belong to the certificate.
Status load_tls_key_pair(SSL_CTX* ctx, const std::string& cert_key, const std::string& cert_file,
                         const std::string& key_key, const std::string& key_file);
// The same check on a throwaway context, for a listener another process
// (mosquitto) serves.
Status check_tls_key_pair(const std::string& cert_key, const std::string& cert_file, const std::string& key_key,
                          const std::string& key_file);
// Checks that a CA file holds at least one PEM certificate.
Status check_ca_file(const std::string& key, const std::string& ca_file);

}  // namespace flotilla::hub
