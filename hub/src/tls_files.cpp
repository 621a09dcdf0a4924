#include "flotilla/hub/tls_files.hpp"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <fstream>
#include <memory>

namespace flotilla::hub {

std::string openssl_error() {
  const unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "unknown OpenSSL error";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof buf);
  return buf;
}

// Each file is checked for readability first so a typo in a path says so,
// rather than an OpenSSL "PEM lib" message.
Status load_tls_key_pair(SSL_CTX* ctx, const std::string& cert_key, const std::string& cert_file,
                         const std::string& key_key, const std::string& key_file) {
  for (const auto& [what, file] : {std::pair{cert_key, cert_file}, std::pair{key_key, key_file}}) {
    std::ifstream f(file);
    if (!f) return make_error(Errc::invalid_argument, what + ": cannot read '" + file + "'");
  }
  ERR_clear_error();
  if (SSL_CTX_use_certificate_chain_file(ctx, cert_file.c_str()) != 1) {
    return make_error(Errc::invalid_argument,
                      cert_key + " '" + cert_file + "' is not a PEM certificate chain: " + openssl_error());
  }
  if (SSL_CTX_use_PrivateKey_file(ctx, key_file.c_str(), SSL_FILETYPE_PEM) != 1) {
    // OpenSSL already compares the key with the certificate here.
    if (ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH) {
      ERR_clear_error();
      return make_error(Errc::invalid_argument,
                        key_key + " '" + key_file + "' does not match the certificate in '" + cert_file + "'");
    }
    return make_error(Errc::invalid_argument, key_key + " '" + key_file + "' is not a PEM private key: " + openssl_error());
  }
  if (SSL_CTX_check_private_key(ctx) != 1) {
    return make_error(Errc::invalid_argument, key_key + " '" + key_file + "' does not match the certificate in '" +
                                                  cert_file + "': " + openssl_error());
  }
  return {};
}

Status check_tls_key_pair(const std::string& cert_key, const std::string& cert_file, const std::string& key_key,
                          const std::string& key_file) {
  std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx(SSL_CTX_new(TLS_server_method()), SSL_CTX_free);
  if (!ctx) return make_error(Errc::internal, "cannot create a TLS context: " + openssl_error());
  return load_tls_key_pair(ctx.get(), cert_key, cert_file, key_key, key_file);
}

Status check_ca_file(const std::string& key, const std::string& ca_file) {
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new_file(ca_file.c_str(), "r"), BIO_free);
  if (!bio) {
    ERR_clear_error();
    return make_error(Errc::invalid_argument, key + ": cannot read '" + ca_file + "'");
  }
  X509* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr);
  if (!cert) {
    ERR_clear_error();
    return make_error(Errc::invalid_argument, key + " '" + ca_file + "' holds no PEM certificate");
  }
  X509_free(cert);
  return {};
}

}  // namespace flotilla::hub
