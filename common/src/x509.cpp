#include "flotilla/common/x509.hpp"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <ctime>
#include <map>
#include <memory>
#include <vector>

namespace flotilla::x509 {

namespace {

template <typename T, void (*F)(T*)>
struct Deleter {
  void operator()(T* p) const { F(p); }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY, EVP_PKEY_free>>;
using ReqPtr = std::unique_ptr<X509_REQ, Deleter<X509_REQ, X509_REQ_free>>;
using CertPtr = std::unique_ptr<X509, Deleter<X509, X509_free>>;
using BioPtr = std::unique_ptr<BIO, Deleter<BIO, BIO_free_all>>;
using StorePtr = std::unique_ptr<X509_STORE, Deleter<X509_STORE, X509_STORE_free>>;
using StoreCtxPtr = std::unique_ptr<X509_STORE_CTX, Deleter<X509_STORE_CTX, X509_STORE_CTX_free>>;
using CrlPtr = std::unique_ptr<X509_CRL, Deleter<X509_CRL, X509_CRL_free>>;

std::string ssl_error() {
  const unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "unknown OpenSSL error";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof buf);
  return buf;
}

int64_t to_unix(const ASN1_TIME* t) {
  std::tm tm{};
  if (!t || ASN1_TIME_to_tm(t, &tm) != 1) return 0;
  return static_cast<int64_t>(::timegm(&tm));
}

CertPtr read_pem_cert(std::string_view pem) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(std::min<size_t>(pem.size(), kMaxPemBytes))));
  if (!bio) return nullptr;
  return CertPtr(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
}

}  // namespace

std::string ed25519_private_key_pem(const Bytes& secret) {
  // PKCS#8 PrivateKeyInfo for Ed25519 (RFC 8410): a fixed prefix, then the
  // 32-byte seed as an OCTET STRING inside the privateKey OCTET STRING.
  static const uint8_t kPrefix[] = {0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b,
                                    0x65, 0x70, 0x04, 0x22, 0x04, 0x20};
  Bytes der(kPrefix, kPrefix + sizeof kPrefix);
  der.insert(der.end(), secret.begin(), secret.begin() + static_cast<std::ptrdiff_t>(std::min<size_t>(32, secret.size())));
  const std::string b64 = to_base64(der);
  std::string out = "-----BEGIN PRIVATE KEY-----\n";
  for (size_t i = 0; i < b64.size(); i += 64) out += b64.substr(i, 64) + "\n";
  out += "-----END PRIVATE KEY-----\n";
  return out;
}

Result<std::string> make_csr(const Bytes& secret, const std::string& common_name) {
  if (secret.size() < 32) return make_error(Errc::invalid_argument, "an Ed25519 key needs a 32-byte seed");
  PkeyPtr key(EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, secret.data(), 32));
  if (!key) return make_error(Errc::internal, "Ed25519 key: " + ssl_error());
  ReqPtr req(X509_REQ_new());
  if (!req || X509_REQ_set_version(req.get(), 0) != 1) return make_error(Errc::internal, "CSR: " + ssl_error());
  X509_NAME* name = X509_REQ_get_subject_name(req.get());
  if (X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(common_name.c_str()),
                                 -1, -1, 0) != 1 ||
      X509_REQ_set_pubkey(req.get(), key.get()) != 1 || X509_REQ_sign(req.get(), key.get(), nullptr) <= 0) {
    return make_error(Errc::internal, "CSR: " + ssl_error());
  }
  unsigned char* der = nullptr;
  const int n = i2d_X509_REQ(req.get(), &der);
  if (n <= 0) return make_error(Errc::internal, "CSR encoding: " + ssl_error());
  std::string out(reinterpret_cast<const char*>(der), static_cast<size_t>(n));
  OPENSSL_free(der);
  return out;
}

Result<CertInfo> parse_certificate_pem(std::string_view pem) {
  CertPtr cert = read_pem_cert(pem);
  if (!cert) {
    ERR_clear_error();
    return make_error(Errc::parse, "not a PEM certificate");
  }
  CertInfo info;
  char cn[256] = {0};
  if (X509_NAME_get_text_by_NID(X509_get_subject_name(cert.get()), NID_commonName, cn, sizeof cn) > 0) {
    info.subject_cn = cn;
  }
  if (EVP_PKEY* pub = X509_get0_pubkey(cert.get()); pub && EVP_PKEY_get_id(pub) == EVP_PKEY_ED25519) {
    size_t len = 32;
    info.ed25519_public_key.resize(len);
    if (EVP_PKEY_get_raw_public_key(pub, info.ed25519_public_key.data(), &len) != 1 || len != 32) {
      info.ed25519_public_key.clear();
    }
  }
  info.not_before_unix = to_unix(X509_get0_notBefore(cert.get()));
  info.not_after_unix = to_unix(X509_get0_notAfter(cert.get()));
  if (BIGNUM* bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert.get()), nullptr)) {
    if (char* hex = BN_bn2hex(bn)) {
      info.serial_hex = hex;
      OPENSSL_free(hex);
    }
    BN_free(bn);
  }
  std::transform(info.serial_hex.begin(), info.serial_hex.end(), info.serial_hex.begin(), ::tolower);
  ERR_clear_error();
  return info;
}

size_t count_certificates(std::string_view pem) {
  size_t n = 0;
  for (size_t at = pem.find("-----BEGIN CERTIFICATE-----"); at != std::string_view::npos;
       at = pem.find("-----BEGIN CERTIFICATE-----", at + 1)) {
    ++n;
  }
  return n;
}

Status verify_certificate(std::string_view cert_pem, std::string_view ca_pem) {
  CertPtr cert = read_pem_cert(cert_pem);
  if (!cert) {
    ERR_clear_error();
    return make_error(Errc::parse, "not a PEM certificate");
  }
  StorePtr store(X509_STORE_new());
  BioPtr bio(BIO_new_mem_buf(ca_pem.data(), static_cast<int>(std::min<size_t>(ca_pem.size(), kMaxPemBytes))));
  if (!store || !bio) return make_error(Errc::internal, "certificate store: " + ssl_error());
  int cas = 0;
  while (X509* ca = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
    X509_STORE_add_cert(store.get(), ca);
    X509_free(ca);
    ++cas;
  }
  ERR_clear_error();
  if (cas == 0) return make_error(Errc::invalid_argument, "no CA certificate to verify against");
  StoreCtxPtr ctx(X509_STORE_CTX_new());
  if (!ctx || X509_STORE_CTX_init(ctx.get(), store.get(), cert.get(), nullptr) != 1) {
    return make_error(Errc::internal, "certificate check: " + ssl_error());
  }
  // A broker client certificate: the extended key usage must allow TLS clients.
  X509_STORE_CTX_set_purpose(ctx.get(), X509_PURPOSE_SSL_CLIENT);
  // Whose certificate it is, not when: a device's clock may be far off at
  // boot, and the broker judges validity by its own.
  X509_STORE_CTX_set_flags(ctx.get(), X509_V_FLAG_NO_CHECK_TIME);
  if (X509_verify_cert(ctx.get()) != 1) {
    const int err = X509_STORE_CTX_get_error(ctx.get());
    ERR_clear_error();
    return make_error(Errc::refused, std::string("certificate does not verify: ") + X509_verify_cert_error_string(err));
  }
  return {};
}

namespace {

std::string name_line(const X509_NAME* n) {
  char buf[512];
  if (!n || !X509_NAME_oneline(n, buf, sizeof buf)) return "?";
  return buf;
}

std::string utc(int64_t unix_s) {
  const std::time_t t = static_cast<std::time_t>(unix_s);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// Every PEM CRL of a text, at most kMaxCrlsPerBundle + 1.
std::vector<CrlPtr> read_crls(std::string_view pem) {
  std::vector<CrlPtr> out;
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(std::min<size_t>(pem.size(), kMaxCrlBundleBytes))));
  if (!bio) return out;
  while (out.size() <= kMaxCrlsPerBundle) {
    X509_CRL* c = PEM_read_bio_X509_CRL(bio.get(), nullptr, nullptr, nullptr);
    if (!c) break;
    out.emplace_back(c);
  }
  ERR_clear_error();
  return out;
}

}  // namespace

Result<std::vector<CrlInfo>> check_crl_bundle(std::string_view crl_pem, std::string_view ca_pem, int64_t now_unix,
                                              std::string_view installed_pem) {
  if (crl_pem.size() > kMaxCrlBundleBytes) {
    return make_error(Errc::too_large, "the revocation list is over " + std::to_string(kMaxCrlBundleBytes) + " bytes");
  }
  std::vector<CertPtr> cas;
  {
    BioPtr bio(BIO_new_mem_buf(ca_pem.data(), static_cast<int>(std::min<size_t>(ca_pem.size(), kMaxPemBytes))));
    while (bio && cas.size() < kMaxCrlsPerBundle) {
      X509* ca = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr);
      if (!ca) break;
      cas.emplace_back(ca);
    }
    ERR_clear_error();
  }
  if (cas.empty()) return make_error(Errc::invalid_argument, "no CA certificate to check the revocation list against");
  const std::vector<CrlPtr> crls = read_crls(crl_pem);
  if (crls.empty()) return make_error(Errc::parse, "no PEM certificate revocation list in the answer");
  if (crls.size() > kMaxCrlsPerBundle) {
    return make_error(Errc::too_large, "more than " + std::to_string(kMaxCrlsPerBundle) + " revocation lists");
  }
  std::map<std::string, int64_t> installed;  // issuer -> this update
  for (const auto& c : read_crls(installed_pem)) {
    const std::string issuer = name_line(X509_CRL_get_issuer(c.get()));
    installed[issuer] = std::max(installed[issuer], to_unix(X509_CRL_get0_lastUpdate(c.get())));
  }
  std::vector<CrlInfo> out;
  for (const auto& c : crls) {
    CrlInfo info;
    const X509_NAME* issuer = X509_CRL_get_issuer(c.get());
    info.issuer = name_line(issuer);
    const X509* signer = nullptr;
    for (const auto& ca : cas) {
      if (X509_NAME_cmp(X509_get_subject_name(ca.get()), issuer) == 0) signer = ca.get();
    }
    if (!signer) {
      return make_error(Errc::refused, "a revocation list from " + info.issuer + ", which is not one of the CAs given");
    }
    if (X509_CRL_verify(c.get(), X509_get0_pubkey(signer)) != 1) {
      ERR_clear_error();
      return make_error(Errc::refused, "the revocation list of " + info.issuer + " is not signed by that CA");
    }
    info.this_update_unix = to_unix(X509_CRL_get0_lastUpdate(c.get()));
    const ASN1_TIME* next = X509_CRL_get0_nextUpdate(c.get());
    if (!next) return make_error(Errc::refused, "the revocation list of " + info.issuer + " has no next update");
    info.next_update_unix = to_unix(next);
    if (info.next_update_unix <= now_unix) {
      return make_error(Errc::refused, "the revocation list of " + info.issuer + " expired at " +
                                           utc(info.next_update_unix) + " (is the hub's clock, or this one, wrong?)");
    }
    if (auto it = installed.find(info.issuer); it != installed.end() && info.this_update_unix < it->second) {
      return make_error(Errc::refused, "the revocation list of " + info.issuer + " was issued at " +
                                           utc(info.this_update_unix) + ", before the one installed (" +
                                           utc(it->second) + "): an older list would let devices revoked since back in");
    }
    const STACK_OF(X509_REVOKED)* revoked = X509_CRL_get_REVOKED(c.get());
    info.revoked = revoked ? static_cast<size_t>(sk_X509_REVOKED_num(revoked)) : 0;
    out.push_back(std::move(info));
  }
  return out;
}

}  // namespace flotilla::x509
