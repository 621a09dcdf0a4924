#include "flotilla/hub/device_ca.hpp"

#include <arpa/inet.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/fs.hpp"
#include "flotilla/common/log.hpp"
#include "flotilla/common/x509.hpp"

namespace flotilla::hub {

namespace {

template <typename T, void (*F)(T*)>
struct Deleter {
  void operator()(T* p) const { F(p); }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY, EVP_PKEY_free>>;
using CertPtr = std::unique_ptr<X509, Deleter<X509, X509_free>>;
using ReqPtr = std::unique_ptr<X509_REQ, Deleter<X509_REQ, X509_REQ_free>>;
using CrlPtr = std::unique_ptr<X509_CRL, Deleter<X509_CRL, X509_CRL_free>>;
using BioPtr = std::unique_ptr<BIO, Deleter<BIO, BIO_free_all>>;
using NamePtr = std::unique_ptr<X509_NAME, Deleter<X509_NAME, X509_NAME_free>>;
using BnPtr = std::unique_ptr<BIGNUM, Deleter<BIGNUM, BN_free>>;
using IntPtr = std::unique_ptr<ASN1_INTEGER, Deleter<ASN1_INTEGER, ASN1_INTEGER_free>>;
using TimePtr = std::unique_ptr<ASN1_TIME, Deleter<ASN1_TIME, ASN1_TIME_free>>;

std::string ssl_error() {
  const unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "unknown OpenSSL error";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof buf);
  return buf;
}

Error ssl_fail(const std::string& what) { return make_error(Errc::internal, what + ": " + ssl_error()); }

// Ed25519 and Ed448 sign the message itself; RSA and ECDSA CAs (an
// operator's) sign a SHA-256 digest.
const EVP_MD* digest_for(EVP_PKEY* key) {
  const int id = EVP_PKEY_get_id(key);
  return id == EVP_PKEY_ED25519 || id == EVP_PKEY_ED448 ? nullptr : EVP_sha256();
}

std::string to_pem(X509* cert) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509(bio.get(), cert);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

std::string key_to_pem(EVP_PKEY* key) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

std::string serial_hex(const ASN1_INTEGER* serial) {
  std::string out;
  if (BIGNUM* bn = ASN1_INTEGER_to_BN(serial, nullptr)) {
    if (char* hex = BN_bn2hex(bn)) {
      out = hex;
      OPENSSL_free(hex);
    }
    BN_free(bn);
  }
  std::transform(out.begin(), out.end(), out.begin(), ::tolower);
  return out;
}

// 127 random bits: positive, never zero, of fixed length (RFC 5280 asks for
// at most 20 octets and unpredictable serials).
IntPtr random_serial() {
  Bytes b = crypto::random_bytes(16);
  b[0] = static_cast<uint8_t>((b[0] & 0x7f) | 0x40);
  BnPtr bn(BN_bin2bn(b.data(), static_cast<int>(b.size()), nullptr));
  return IntPtr(bn ? BN_to_ASN1_INTEGER(bn.get(), nullptr) : nullptr);
}

int64_t to_unix(const ASN1_TIME* t) {
  std::tm tm{};
  if (!t || ASN1_TIME_to_tm(t, &tm) != 1) return 0;
  return static_cast<int64_t>(::timegm(&tm));
}

bool add_ext(X509* cert, X509V3_CTX* ctx, int nid, const std::string& value) {
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, ctx, nid, value.c_str());
  if (!ext) return false;
  const bool ok = X509_add_ext(cert, ext, -1) == 1;
  X509_EXTENSION_free(ext);
  return ok;
}

PkeyPtr new_ed25519() { return PkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519")); }

// A self-signed Ed25519 CA, valid ten years: it only ever signs client
// certificates, the broker's certificate and revocation lists.
Result<std::pair<CertPtr, PkeyPtr>> make_ca(int64_t now) {
  PkeyPtr key = new_ed25519();
  CertPtr cert(X509_new());
  IntPtr serial = random_serial();
  if (!key || !cert || !serial) return ssl_fail("make the device CA");
  X509_set_version(cert.get(), 2);
  X509_set_serialNumber(cert.get(), serial.get());
  NamePtr name(X509_NAME_new());
  const std::string cn = "Flotilla device CA " + crypto::random_token(4);
  X509_NAME_add_entry_by_txt(name.get(), "O", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>("Flotilla"), -1,
                             -1, 0);
  X509_NAME_add_entry_by_txt(name.get(), "CN", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(cn.c_str()), -1,
                             -1, 0);
  X509_set_subject_name(cert.get(), name.get());
  X509_set_issuer_name(cert.get(), name.get());
  ASN1_TIME_set(X509_getm_notBefore(cert.get()), static_cast<time_t>(now - 300));
  ASN1_TIME_set(X509_getm_notAfter(cert.get()), static_cast<time_t>(now + int64_t{3653} * 86400));
  X509_set_pubkey(cert.get(), key.get());
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, cert.get(), cert.get(), nullptr, nullptr, 0);
  if (!add_ext(cert.get(), &ctx, NID_basic_constraints, "critical,CA:TRUE,pathlen:0") ||
      !add_ext(cert.get(), &ctx, NID_key_usage, "critical,keyCertSign,cRLSign") ||
      !add_ext(cert.get(), &ctx, NID_subject_key_identifier, "hash") ||
      X509_sign(cert.get(), key.get(), nullptr) <= 0) {
    return ssl_fail("make the device CA");
  }
  return std::make_pair(std::move(cert), std::move(key));
}

// The private key of a CA must be the hub's alone.
Status check_key_mode(const std::string& setting, const std::string& file) {
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0) return make_error(Errc::invalid_argument, setting + ": cannot read '" + file + "'");
  if (st.st_mode & 077) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return make_error(Errc::invalid_argument, setting + " '" + file + "' has mode " + mode +
                                                  ": group or others may read it; make it 0600");
  }
  return {};
}

// A CA certificate and its key from PEM files; refused unless the
// certificate is a CA whose key this is.
Result<std::pair<CertPtr, PkeyPtr>> load_ca(const std::string& what, const std::string& cert_file,
                                            const std::string& key_file) {
  if (auto s = check_key_mode(what + " key", key_file); !s) return s.error();
  auto cert_text = fs::read_file(cert_file, 1 << 20);
  if (!cert_text) return make_error(Errc::invalid_argument, what + ": cannot read '" + cert_file + "'");
  auto key_text = fs::read_file(key_file, 1 << 20);
  if (!key_text) return make_error(Errc::invalid_argument, what + " key: cannot read '" + key_file + "'");
  BioPtr cb(BIO_new_mem_buf(cert_text->data(), static_cast<int>(cert_text->size())));
  CertPtr cert(PEM_read_bio_X509(cb.get(), nullptr, nullptr, nullptr));
  if (!cert) {
    ERR_clear_error();
    return make_error(Errc::invalid_argument, what + " '" + cert_file + "' holds no PEM certificate");
  }
  BioPtr kb(BIO_new_mem_buf(key_text->data(), static_cast<int>(key_text->size())));
  PkeyPtr key(PEM_read_bio_PrivateKey(kb.get(), nullptr, nullptr, nullptr));
  if (!key) {
    ERR_clear_error();
    return make_error(Errc::invalid_argument, what + " key '" + key_file +
                                                  "' is not an unencrypted PEM private key (the hub cannot ask for "
                                                  "a passphrase)");
  }
  if (X509_check_ca(cert.get()) < 1) {
    ERR_clear_error();
    return make_error(Errc::invalid_argument, what + " '" + cert_file + "' is not a CA certificate (basicConstraints "
                                                  "CA:TRUE)");
  }
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    ERR_clear_error();
    return make_error(Errc::invalid_argument, what + " key '" + key_file + "' does not belong to '" + cert_file + "'");
  }
  return std::make_pair(std::move(cert), std::move(key));
}

std::string subject_text(X509* cert) {
  char buf[512] = {0};
  X509_NAME_oneline(X509_get_subject_name(cert), buf, sizeof buf);
  return buf;
}

}  // namespace

DeviceCa::~DeviceCa() {
  X509_free(issuer_.cert);
  EVP_PKEY_free(issuer_.key);
  for (auto& c : others_) {
    X509_free(c.cert);
    EVP_PKEY_free(c.key);
  }
}

Result<std::unique_ptr<DeviceCa>> DeviceCa::ephemeral(int64_t now_unix) {
  auto made = make_ca(now_unix);
  if (!made) return made.error();
  std::unique_ptr<DeviceCa> ca(new DeviceCa());
  ca->issuer_ = {made->first.release(), made->second.release()};
  ca->issuer_pem_ = to_pem(ca->issuer_.cert);
  ca->trust_pem_ = ca->issuer_pem_;
  ca->issuer_subject_ = subject_text(ca->issuer_.cert);
  ca->issuer_not_after_ = to_unix(X509_get0_notAfter(ca->issuer_.cert));
  return ca;
}

Result<std::unique_ptr<DeviceCa>> DeviceCa::open(const DeviceCaConfig& cfg, int64_t now_unix) {
  if (cfg.cert_file.empty() != cfg.key_file.empty()) {
    return make_error(Errc::invalid_argument, "device-ca-cert and device-ca-key go together");
  }
  if (auto s = fs::ensure_own_dir(cfg.dir, 0700); !s) return s.error();
  std::unique_ptr<DeviceCa> ca(new DeviceCa());
  std::string cert_file = cfg.cert_file, key_file = cfg.key_file;
  if (cert_file.empty()) {
    cert_file = (cfg.dir / "device-ca.pem").string();
    key_file = (cfg.dir / "device-ca.key").string();
    if (!fs::stdfs::exists(cert_file) && !fs::stdfs::exists(key_file)) {
      auto made = make_ca(now_unix);
      if (!made) return made.error();
      // Key first: a certificate without its key would be refused at the next start.
      if (auto s = fs::write_file_atomic(key_file, key_to_pem(made->second.get()), 0600); !s) return s.error();
      if (auto s = fs::write_file_atomic(cert_file, to_pem(made->first.get()), 0644); !s) return s.error();
      log::get("hub")->info("made the device CA {} ({})", cert_file, subject_text(made->first.get()));
    }
  }
  auto issuer = load_ca("device CA", cert_file, key_file);
  if (!issuer) return issuer.error();
  ca->issuer_ = {issuer->first.release(), issuer->second.release()};
  ca->issuer_pem_ = to_pem(ca->issuer_.cert);
  ca->issuer_subject_ = subject_text(ca->issuer_.cert);
  ca->issuer_not_after_ = to_unix(X509_get0_notAfter(ca->issuer_.cert));
  if (ca->issuer_not_after_ <= now_unix) {
    return make_error(Errc::invalid_argument, "the device CA '" + cert_file + "' has expired; rotate it "
                                              "(docs/operations.md, \"Rotating the device CA\")");
  }
  ca->trust_pem_ = ca->issuer_pem_;
  // A rotation in progress: the next CA is trusted before it issues, the
  // previous one until the certificates it issued have expired.
  for (const char* name : {"next-ca", "previous-ca"}) {
    const auto pem = cfg.dir / (std::string(name) + ".pem");
    const auto key = cfg.dir / (std::string(name) + ".key");
    if (!fs::stdfs::exists(pem) && !fs::stdfs::exists(key)) continue;
    auto other = load_ca(name, pem.string(), key.string());
    if (!other) return other.error();
    ca->trust_pem_ += to_pem(other->first.get());
    ca->others_.push_back({other->first.release(), other->second.release()});
    log::get("hub")->info("device CA rotation: {} {} is trusted too", name, subject_text(ca->others_.back().cert));
  }
  return ca;
}

Result<IssuedCertificate> DeviceCa::issue(EVP_PKEY* subject_key, const std::string& cn,
                                          const std::vector<std::string>& names, bool server, int64_t now,
                                          int64_t lifetime_s) const {
  CertPtr cert(X509_new());
  IntPtr serial = random_serial();
  NamePtr name(X509_NAME_new());
  if (!cert || !serial || !name) return ssl_fail("certificate");
  X509_set_version(cert.get(), 2);
  X509_set_serialNumber(cert.get(), serial.get());
  if (X509_NAME_add_entry_by_txt(name.get(), "CN", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(cn.c_str()),
                                 -1, -1, 0) != 1) {
    return ssl_fail("certificate subject");
  }
  X509_set_subject_name(cert.get(), name.get());
  X509_set_issuer_name(cert.get(), X509_get_subject_name(issuer_.cert));
  // Five minutes of slack for device clocks (a tenth of a short lifetime,
  // so that the renewal point, a share of not_after - not_before, stays
  // ahead); never past the CA's own end.
  const int64_t slack = std::min<int64_t>(300, lifetime_s / 10);
  const int64_t not_after = std::min(now + lifetime_s, issuer_not_after_);
  ASN1_TIME_set(X509_getm_notBefore(cert.get()), static_cast<time_t>(now - slack));
  ASN1_TIME_set(X509_getm_notAfter(cert.get()), static_cast<time_t>(not_after));
  X509_set_pubkey(cert.get(), subject_key);
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, issuer_.cert, cert.get(), nullptr, nullptr, 0);
  std::string san;
  for (const auto& n : names) {
    in6_addr ip{};
    const bool is_ip = ::inet_pton(AF_INET, n.c_str(), &ip) == 1 || ::inet_pton(AF_INET6, n.c_str(), &ip) == 1;
    san += (san.empty() ? "" : ",") + std::string(is_ip ? "IP:" : "DNS:") + n;
  }
  // The extended key usage keeps the two kinds apart: a device's
  // certificate cannot serve as a broker, nor the broker's as a client.
  if (!add_ext(cert.get(), &ctx, NID_basic_constraints, "critical,CA:FALSE") ||
      !add_ext(cert.get(), &ctx, NID_key_usage, "critical,digitalSignature") ||
      !add_ext(cert.get(), &ctx, NID_ext_key_usage, server ? "serverAuth" : "clientAuth") ||
      !add_ext(cert.get(), &ctx, NID_subject_key_identifier, "hash") ||
      !add_ext(cert.get(), &ctx, NID_authority_key_identifier, "keyid:always") ||
      (!san.empty() && !add_ext(cert.get(), &ctx, NID_subject_alt_name, san))) {
    return ssl_fail("certificate extensions");
  }
  if (X509_sign(cert.get(), issuer_.key, digest_for(issuer_.key)) <= 0) return ssl_fail("sign certificate");
  IssuedCertificate out;
  out.pem = to_pem(cert.get());
  out.serial_hex = serial_hex(serial.get());
  out.not_before_unix = now - slack;
  out.not_after_unix = not_after;
  return out;
}

Result<IssuedCertificate> DeviceCa::issue_for_csr(std::string_view csr_der, const Bytes& device_key,
                                                  const std::string& device_id, int64_t now_unix,
                                                  int64_t lifetime_s) const {
  if (csr_der.empty()) return make_error(Errc::invalid_argument, "csr is empty");
  if (csr_der.size() > x509::kMaxCsrBytes) {
    return make_error(Errc::invalid_argument, "csr is " + std::to_string(csr_der.size()) + " bytes; at most " +
                                                  std::to_string(x509::kMaxCsrBytes));
  }
  const auto* p = reinterpret_cast<const unsigned char*>(csr_der.data());
  ReqPtr req(d2i_X509_REQ(nullptr, &p, static_cast<long>(csr_der.size())));
  if (!req || p != reinterpret_cast<const unsigned char*>(csr_der.data()) + csr_der.size()) {
    ERR_clear_error();
    return make_error(Errc::invalid_argument, "csr is not one DER PKCS#10 certificate request");
  }
  EVP_PKEY* pub = X509_REQ_get0_pubkey(req.get());
  if (!pub || EVP_PKEY_get_id(pub) != EVP_PKEY_ED25519) {
    ERR_clear_error();
    return make_error(Errc::invalid_argument, "csr must be for the device's Ed25519 identity key");
  }
  Bytes raw(32);
  size_t len = raw.size();
  if (EVP_PKEY_get_raw_public_key(pub, raw.data(), &len) != 1 || len != 32 || raw != device_key) {
    ERR_clear_error();
    return make_error(Errc::invalid_argument, "csr is for another key than the device's identity key");
  }
  if (X509_REQ_verify(req.get(), pub) != 1) {
    ERR_clear_error();
    return make_error(Errc::invalid_argument, "csr signature does not verify");
  }
  const X509_NAME* subject = X509_REQ_get_subject_name(req.get());
  const X509_NAME_ENTRY* entry = X509_NAME_entry_count(subject) == 1 ? X509_NAME_get_entry(subject, 0) : nullptr;
  const ASN1_STRING* value = entry ? X509_NAME_ENTRY_get_data(entry) : nullptr;
  if (!entry || OBJ_obj2nid(X509_NAME_ENTRY_get_object(entry)) != NID_commonName || !value ||
      std::string_view(reinterpret_cast<const char*>(ASN1_STRING_get0_data(value)),
                       static_cast<size_t>(ASN1_STRING_length(value))) != device_id) {
    return make_error(Errc::invalid_argument, "csr subject must be exactly CN=" + device_id);
  }
  // Attributes would carry requested extensions; the hub decides those.
  if (X509_REQ_get_attr_count(req.get()) != 0) {
    return make_error(Errc::invalid_argument, "csr must not carry attributes or requested extensions");
  }
  return issue(pub, device_id, {}, false, now_unix, lifetime_s);
}

Result<IssuedCertificate> DeviceCa::issue_server(const std::vector<std::string>& names, int64_t now_unix,
                                                 int64_t lifetime_s) const {
  PkeyPtr key = new_ed25519();
  if (!key) return ssl_fail("server key");
  auto c = issue(key.get(), names.empty() ? std::string("flotilla-broker") : names.front(), names, true, now_unix,
                 lifetime_s);
  if (!c) return c;
  c->key_pem = key_to_pem(key.get());
  return c;
}

Result<IssuedCertificate> DeviceCa::issue_client(const std::string& cn, int64_t now_unix, int64_t lifetime_s) const {
  PkeyPtr key = new_ed25519();
  if (!key) return ssl_fail("client key");
  auto c = issue(key.get(), cn, {}, false, now_unix, lifetime_s);
  if (!c) return c;
  c->key_pem = key_to_pem(key.get());
  return c;
}

Result<std::string> DeviceCa::crl_pem(const Revoked& revoked, int64_t now, int64_t next_update_s) const {
  std::string out;
  std::vector<const Ca*> all = {&issuer_};
  for (const auto& o : others_) all.push_back(&o);
  for (const Ca* ca : all) {
    CrlPtr crl(X509_CRL_new());
    TimePtr last(ASN1_TIME_set(nullptr, static_cast<time_t>(now - 300)));
    TimePtr next(ASN1_TIME_set(nullptr, static_cast<time_t>(now + next_update_s)));
    if (!crl || !last || !next || X509_CRL_set_version(crl.get(), 1) != 1 ||
        X509_CRL_set_issuer_name(crl.get(), X509_get_subject_name(ca->cert)) != 1 ||
        X509_CRL_set1_lastUpdate(crl.get(), last.get()) != 1 || X509_CRL_set1_nextUpdate(crl.get(), next.get()) != 1) {
      return ssl_fail("revocation list");
    }
    for (const auto& [hex, when] : revoked) {
      BIGNUM* raw = nullptr;
      if (BN_hex2bn(&raw, hex.c_str()) == 0) continue;
      BnPtr bn(raw);
      IntPtr serial(BN_to_ASN1_INTEGER(bn.get(), nullptr));
      TimePtr at(ASN1_TIME_set(nullptr, static_cast<time_t>(when)));
      X509_REVOKED* r = X509_REVOKED_new();
      if (!serial || !at || !r || X509_REVOKED_set_serialNumber(r, serial.get()) != 1 ||
          X509_REVOKED_set_revocationDate(r, at.get()) != 1 || X509_CRL_add0_revoked(crl.get(), r) != 1) {
        X509_REVOKED_free(r);
        return ssl_fail("revocation list entry");
      }
    }
    X509_CRL_sort(crl.get());
    // A growing CRL number lets an external broker tell newer lists from older.
    BnPtr number(BN_new());
    BN_set_word(number.get(), static_cast<BN_ULONG>(now));
    IntPtr num(BN_to_ASN1_INTEGER(number.get(), nullptr));
    if (!num || X509_CRL_add1_ext_i2d(crl.get(), NID_crl_number, num.get(), 0, 0) != 1 ||
        X509_CRL_sign(crl.get(), ca->key, digest_for(ca->key)) <= 0) {
      return ssl_fail("sign revocation list");
    }
    BioPtr bio(BIO_new(BIO_s_mem()));
    PEM_write_bio_X509_CRL(bio.get(), crl.get());
    char* data = nullptr;
    const long n = BIO_get_mem_data(bio.get(), &data);
    out.append(data, static_cast<size_t>(n));
  }
  return out;
}

}  // namespace flotilla::hub
