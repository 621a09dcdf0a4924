#pragma once
// The device side of broker certificates: a certificate request for the
// device's Ed25519 identity key, that key in the PEM form TLS libraries
// read, and the few facts a device needs from a certificate it was given.
// Shared by the agent, the simulator and the tests; the hub's CA is in
// hub/ (device_ca.hpp). docs/adr/0013-device-certificates.md.
#include <cstdint>
#include <string>
#include <string_view>

#include "flotilla/common/encoding.hpp"
#include "flotilla/common/result.hpp"

namespace flotilla::x509 {

// The largest certificate request the hub takes (an Ed25519 request with a
// short subject is under 200 bytes).
inline constexpr size_t kMaxCsrBytes = 4096;
// The largest PEM (certificate, CA bundle) a device keeps from an answer.
inline constexpr size_t kMaxPemBytes = 64 * 1024;

// PKCS#8 PEM of an Ed25519 private key. secret is libsodium's 64-byte
// seed||public (or the 32-byte seed): the same key, in the form Paho and
// OpenSSL read from a file.
std::string ed25519_private_key_pem(const Bytes& secret);
// A PKCS#10 request (DER) for the Ed25519 key, subject CN = common_name,
// signed by that key.
Result<std::string> make_csr(const Bytes& secret, const std::string& common_name);

struct CertInfo {
  std::string subject_cn;
  Bytes ed25519_public_key;  // raw 32 bytes; empty for another key type
  int64_t not_before_unix = 0;
  int64_t not_after_unix = 0;
  std::string serial_hex;    // lower case, no leading zeros
};
// The first certificate of a PEM text.
Result<CertInfo> parse_certificate_pem(std::string_view pem);
// Whether the first certificate of cert_pem chains to a CA certificate in
// ca_pem as a TLS client certificate; the error says why not. Validity
// times are not checked (a device's clock may be wrong; the broker checks).
Status verify_certificate(std::string_view cert_pem, std::string_view ca_pem);
// Number of PEM certificates in a text (a CA bundle).
size_t count_certificates(std::string_view pem);

// Certificate revocation lists for a broker the hub does not run
// (flotilla cell crl-sync). A CRL bundle is the hub's GET /v1/device-ca/crl:
// one PEM CRL per device CA it holds.
inline constexpr size_t kMaxCrlBundleBytes = 64u << 20;  // a list of every revoked device
inline constexpr size_t kMaxCrlsPerBundle = 16;
struct CrlInfo {
  std::string issuer;  // the issuing CA's name, one line
  int64_t this_update_unix = 0;
  int64_t next_update_unix = 0;
  size_t revoked = 0;  // certificates it lists
};
// Checks a CRL bundle before a broker is given it: at least one CRL, each
// signed by the CA certificate in ca_pem whose name is its issuer, none
// expired at now_unix, and (installed_pem: the bundle the broker has now,
// "" for none) none older than the installed CRL of the same issuer, which
// would let devices revoked since back in. The error says which and why.
Result<std::vector<CrlInfo>> check_crl_bundle(std::string_view crl_pem, std::string_view ca_pem, int64_t now_unix,
                                              std::string_view installed_pem);

}  // namespace flotilla::x509
