#pragma once
// The hub's device CA: it issues each device's broker client certificate
// (CN = device id) from the device's own certificate request, the embedded
// broker's server certificate and the hub's own client certificate, and
// signs the revocation list the broker loads. Brokers need only its
// certificate, so enrolling a device changes nothing in any broker
// (docs/adr/0013-device-certificates.md, docs/security.md "Device certificates").
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "flotilla/common/encoding.hpp"
#include "flotilla/common/result.hpp"

typedef struct evp_pkey_st EVP_PKEY;
typedef struct x509_st X509;

namespace flotilla::hub {

struct IssuedCertificate {
  std::string pem;
  std::string key_pem;     // for certificates whose key the hub made (broker, its own session, probes)
  std::string serial_hex;  // lower case, no leading zeros (as x509::CertInfo)
  int64_t not_before_unix = 0;
  int64_t not_after_unix = 0;
};

struct DeviceCaConfig {
  // <data-dir>/ca: device-ca.pem (0644) and device-ca.key (0600), made on
  // first start unless the operator gives cert_file and key_file. Also read
  // from here during a rotation: next-ca.{pem,key} (trusted, not issuing
  // yet) and previous-ca.{pem,key} (still trusted, no longer issuing).
  std::filesystem::path dir;
  std::string cert_file;  // the operator's CA (both or neither)
  std::string key_file;
};

class DeviceCa {
 public:
  static Result<std::unique_ptr<DeviceCa>> open(const DeviceCaConfig& cfg, int64_t now_unix);
  // An in-memory CA (unit tests, benchmarks).
  static Result<std::unique_ptr<DeviceCa>> ephemeral(int64_t now_unix);
  ~DeviceCa();
  DeviceCa(const DeviceCa&) = delete;
  DeviceCa& operator=(const DeviceCa&) = delete;

  // Every CA certificate a broker accepts client certificates from, and a
  // device accepts the broker's certificate from: the issuing CA first.
  const std::string& trust_pem() const { return trust_pem_; }
  const std::string& issuer_pem() const { return issuer_pem_; }
  const std::string& issuer_subject() const { return issuer_subject_; }
  int64_t issuer_not_after_unix() const { return issuer_not_after_; }

  // A device's broker client certificate for the key in csr_der. The
  // request must be DER of at most x509::kMaxCsrBytes, self-signed by
  // device_key (the Ed25519 identity the device proved it holds), with
  // subject exactly CN = device_id and no attributes (so no requested
  // extensions): anything else is refused with invalid_argument. The
  // certificate is the hub's own making: subject CN = device_id, key usage
  // digitalSignature, extended key usage clientAuth, valid from five
  // minutes ago (device clocks) for lifetime_s.
  Result<IssuedCertificate> issue_for_csr(std::string_view csr_der, const Bytes& device_key,
                                          const std::string& device_id, int64_t now_unix, int64_t lifetime_s) const;
  // A certificate for a new Ed25519 key made here: a TLS server certificate
  // naming `names` (IP addresses or DNS names), or a client one with CN = cn.
  Result<IssuedCertificate> issue_server(const std::vector<std::string>& names, int64_t now_unix,
                                         int64_t lifetime_s) const;
  Result<IssuedCertificate> issue_client(const std::string& cn, int64_t now_unix, int64_t lifetime_s) const;
  // One CRL per CA held here (issuing, next, previous), each listing every
  // revoked serial (hex, with when it was revoked), valid until now +
  // next_update_s; PEM, concatenated: what the broker's crlfile holds.
  using Revoked = std::vector<std::pair<std::string, int64_t>>;
  Result<std::string> crl_pem(const Revoked& revoked, int64_t now_unix, int64_t next_update_s) const;

  // Whether device certificates are written from the template and signed
  // with libsodium (an Ed25519 issuing CA whose template agreed with
  // OpenSSL's own builder when the CA was opened), rather than built by
  // OpenSSL one by one. Both give the same bytes.
  bool uses_template() const { return template_ != nullptr; }
  // That agreement for one device key, CN and time: true when the template
  // and OpenSSL make byte-identical certificates (same serial; Ed25519
  // signatures are deterministic). Checked once at open, and by the tests
  // over many names and times.
  Result<bool> template_agrees(const Bytes& device_key, const std::string& cn, int64_t now_unix,
                               int64_t lifetime_s) const;

 private:
  struct Ca {
    X509* cert = nullptr;
    EVP_PKEY* key = nullptr;
  };
  // A device certificate's DER with everything but its key, name, serial
  // and times fixed, signed by the issuing CA's Ed25519 key directly
  // (device_ca.cpp, "The device-certificate template").
  struct Template;
  DeviceCa();
  Result<IssuedCertificate> issue(EVP_PKEY* subject_key, const std::string& cn, const std::vector<std::string>& names,
                                  bool server, int64_t now_unix, int64_t lifetime_s, const Bytes& serial) const;
  Result<IssuedCertificate> issue_from_template(const Bytes& subject_key, const std::string& cn, int64_t now_unix,
                                                int64_t lifetime_s, const Bytes& serial) const;
  void make_template();
  Ca issuer_;
  std::unique_ptr<Template> template_;  // null: OpenSSL builds each certificate (a non-Ed25519 operator CA)
  std::vector<Ca> others_;  // next and previous, during a rotation
  std::string trust_pem_, issuer_pem_, issuer_subject_;
  int64_t issuer_not_after_ = 0;
};

}  // namespace flotilla::hub
