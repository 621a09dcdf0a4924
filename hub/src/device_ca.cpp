#include "flotilla/hub/device_ca.hpp"

#include <arpa/inet.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sodium.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <ctime>
#include <optional>

#include "flotilla/common/crypto.hpp"
#include "flotilla/common/encoding.hpp"
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
// at most 20 octets and unpredictable serials). Its first byte is 0x40 to
// 0x7f, so its DER is these 16 bytes and its hex has no leading zero.
Bytes random_serial_bytes() {
  Bytes b = crypto::random_bytes(16);
  b[0] = static_cast<uint8_t>((b[0] & 0x7f) | 0x40);
  return b;
}

IntPtr to_asn1_integer(const Bytes& b) {
  BnPtr bn(BN_bin2bn(b.data(), static_cast<int>(b.size()), nullptr));
  return IntPtr(bn ? BN_to_ASN1_INTEGER(bn.get(), nullptr) : nullptr);
}

IntPtr random_serial() { return to_asn1_integer(random_serial_bytes()); }

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

// ---- DER, for the device-certificate template ------------------------------

void der_append(std::string& out, uint8_t tag, std::string_view content) {
  out.push_back(static_cast<char>(tag));
  const size_t n = content.size();
  if (n < 0x80) {
    out.push_back(static_cast<char>(n));
  } else {
    int bytes = 0;
    for (size_t v = n; v; v >>= 8) ++bytes;
    out.push_back(static_cast<char>(0x80 | bytes));
    for (int i = bytes - 1; i >= 0; --i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  }
  out.append(content);
}

std::string der(uint8_t tag, std::string_view content) {
  std::string out;
  out.reserve(content.size() + 6);
  der_append(out, tag, content);
  return out;
}

// A positive INTEGER from big-endian bytes: no leading zero byte unless the
// next one has its top bit set.
std::string der_unsigned(const Bytes& b) {
  size_t i = 0;
  while (i + 1 < b.size() && b[i] == 0) ++i;
  std::string v;
  if (b[i] & 0x80) v.push_back('\0');
  v.append(reinterpret_cast<const char*>(b.data()) + i, b.size() - i);
  return der(0x02, v);
}

// A Time as OpenSSL's ASN1_TIME_set writes it (RFC 5280 4.1.2.5): UTCTime
// for 1950 to 2049, GeneralizedTime otherwise; nullopt past year 9999.
std::optional<std::string> der_time(int64_t t) {
  const time_t tt = static_cast<time_t>(t);
  std::tm tm{};
  if (!::gmtime_r(&tt, &tm)) return std::nullopt;
  const int year = tm.tm_year + 1900;
  if (year < 0 || year > 9999) return std::nullopt;
  char buf[32];
  const bool utc = year >= 1950 && year < 2050;
  if (utc) {
    std::snprintf(buf, sizeof buf, "%02d%02d%02d%02d%02d%02dZ", year % 100, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                  tm.tm_min, tm.tm_sec);
  } else {
    std::snprintf(buf, sizeof buf, "%04d%02d%02d%02d%02d%02dZ", year, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                  tm.tm_sec);
  }
  return der(utc ? 0x17 : 0x18, buf);
}

// The AlgorithmIdentifier of Ed25519 (RFC 8410: the OID, no parameters).
constexpr std::string_view kEd25519Alg("\x30\x05\x06\x03\x2b\x65\x70", 7);

std::string der_of_ext(X509_EXTENSION* ext) {
  unsigned char* out = nullptr;
  const int n = i2d_X509_EXTENSION(ext, &out);
  if (n <= 0) return {};
  std::string s(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
  OPENSSL_free(out);
  return s;
}

// The first element inside a DER SEQUENCE, with its header: the signed part
// of a certificate request as it arrived. nullopt for anything but definite
// lengths (BER's indefinite form goes to OpenSSL's own check).
std::optional<std::string_view> first_element(std::string_view d) {
  auto header = [](std::string_view s, size_t at, size_t* len) -> size_t {
    if (at + 2 > s.size() || static_cast<uint8_t>(s[at]) != 0x30) return 0;
    const auto b = static_cast<uint8_t>(s[at + 1]);
    if (b < 0x80) {
      *len = b;
      return 2;
    }
    const int n = b & 0x7f;
    if (n == 0 || n > 4 || at + 2 + static_cast<size_t>(n) > s.size()) return 0;
    size_t v = 0;
    for (int i = 0; i < n; ++i) v = (v << 8) | static_cast<uint8_t>(s[at + 2 + static_cast<size_t>(i)]);
    *len = v;
    return 2 + static_cast<size_t>(n);
  };
  size_t outer = 0, inner = 0;
  const size_t h1 = header(d, 0, &outer);
  if (h1 == 0 || h1 + outer != d.size()) return std::nullopt;
  const size_t h2 = header(d, h1, &inner);
  if (h2 == 0 || h1 + h2 + inner > d.size()) return std::nullopt;
  return d.substr(h1, h2 + inner);
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

// The request's self-signature. Ed25519 is checked by libsodium over the
// signed bytes as they arrived (what OpenSSL checks too, from its cached
// encoding) with the same conditions as OpenSSL's (algorithm Ed25519 with
// no parameters, a 64-byte signature, no unused bits); without OpenSSL's
// per-call provider lookups. Anything unusual goes to X509_REQ_verify.
bool csr_signature_verifies(X509_REQ* req, std::string_view der, EVP_PKEY* pub, const Bytes& device_key) {
  const ASN1_BIT_STRING* sig = nullptr;
  const X509_ALGOR* alg = nullptr;
  X509_REQ_get0_signature(req, &sig, &alg);
  const ASN1_OBJECT* oid = nullptr;
  int ptype = 0;
  const void* pval = nullptr;
  if (alg) X509_ALGOR_get0(&oid, &ptype, &pval, alg);
  const auto info = first_element(der);
  if (!sig || !oid || !info || device_key.size() != crypto_sign_PUBLICKEYBYTES) return X509_REQ_verify(req, pub) == 1;
  if (OBJ_obj2nid(oid) != NID_ED25519 || ptype != V_ASN1_UNDEF) return false;
  if (sig->flags & 0x07) return false;
  if (ASN1_STRING_length(sig) != crypto_sign_BYTES) return false;
  return crypto_sign_verify_detached(ASN1_STRING_get0_data(sig), reinterpret_cast<const unsigned char*>(info->data()),
                                     info->size(), device_key.data()) == 0;
}

std::string subject_text(X509* cert) {
  char buf[512] = {0};
  X509_NAME_oneline(X509_get_subject_name(cert), buf, sizeof buf);
  return buf;
}

}  // namespace

// ---- The device-certificate template ---------------------------------------
// Issuing through OpenSSL 3 was the largest cost of an enrollment: building
// the extensions from text, property lookups and locks at every step, an
// EVP signature. A device certificate differs from the next only in its
// serial, times, CN, key and the key's identifier, so the rest (issuer name,
// the fixed extensions as OpenSSL encoded them for this CA) is kept as DER
// and the to-be-signed bytes are signed with the CA's Ed25519 key by
// libsodium. The result is checked byte for byte against OpenSSL's builder
// when the CA is opened; any other CA key type keeps OpenSSL's path.
struct DeviceCa::Template {
  unsigned char sk[crypto_sign_SECRETKEYBYTES] = {0};
  std::string issuer_name;                  // DER of the CA's subject
  std::string exts_before_ski, exts_after_ski;  // DER of the fixed extensions, in OpenSSL's order
  EVP_MD* sha1 = nullptr;                   // fetched once: the subject key identifier
  ~Template() {
    sodium_memzero(sk, sizeof sk);
    EVP_MD_free(sha1);
  }
  // Names the template writes exactly as OpenSSL does (a UTF8String of at
  // most 64 characters); any other goes to OpenSSL, which also refuses
  // what it must.
  static bool fits(const std::string& cn) {
    if (cn.empty() || cn.size() > 64) return false;
    return std::all_of(cn.begin(), cn.end(), [](char c) { return c >= 0x20 && c < 0x7f; });
  }
};

DeviceCa::DeviceCa() = default;

void DeviceCa::make_template() {
  template_.reset();
  if (EVP_PKEY_get_id(issuer_.key) != EVP_PKEY_ED25519) return;
  auto t = std::make_unique<Template>();
  unsigned char seed[32], pk[32], ca_pk[32];
  size_t seed_len = sizeof seed, pk_len = sizeof ca_pk;
  const bool keys = EVP_PKEY_get_raw_private_key(issuer_.key, seed, &seed_len) == 1 && seed_len == 32 &&
                    EVP_PKEY_get_raw_public_key(issuer_.key, ca_pk, &pk_len) == 1 && pk_len == 32 &&
                    crypto_sign_seed_keypair(pk, t->sk, seed) == 0 && std::memcmp(pk, ca_pk, 32) == 0;
  sodium_memzero(seed, sizeof seed);
  t->sha1 = EVP_MD_fetch(nullptr, "SHA1", nullptr);
  unsigned char* name = nullptr;
  const int name_len = i2d_X509_NAME(X509_get_subject_name(issuer_.cert), &name);
  if (name_len > 0) t->issuer_name.assign(reinterpret_cast<const char*>(name), static_cast<size_t>(name_len));
  OPENSSL_free(name);
  auto log = log::get("hub");
  if (!keys || !t->sha1 || t->issuer_name.empty()) {
    ERR_clear_error();
    log->warn("device CA: no certificate template ({}); OpenSSL builds each certificate", ssl_error());
    return;
  }
  // The fixed extensions, as OpenSSL encodes them for this CA: from a
  // client certificate it builds once, for a throwaway key.
  const int64_t now = static_cast<int64_t>(::time(nullptr));
  PkeyPtr probe_key = new_ed25519();
  auto probe = probe_key ? issue(probe_key.get(), "template", {}, false, now, 86400, random_serial_bytes())
                         : Result<IssuedCertificate>(make_error(Errc::internal, "key"));
  CertPtr cert;
  if (probe) {
    BioPtr bio(BIO_new_mem_buf(probe->pem.data(), static_cast<int>(probe->pem.size())));
    cert.reset(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  }
  bool ski = false;
  for (int i = 0; cert && i < X509_get_ext_count(cert.get()); ++i) {
    X509_EXTENSION* ext = X509_get_ext(cert.get(), i);
    if (OBJ_obj2nid(X509_EXTENSION_get_object(ext)) == NID_subject_key_identifier) {
      ski = true;
      continue;
    }
    (ski ? t->exts_after_ski : t->exts_before_ski) += der_of_ext(ext);
  }
  if (!cert || !ski) {
    ERR_clear_error();
    log->warn("device CA: no certificate template (no probe certificate); OpenSSL builds each certificate");
    return;
  }
  template_ = std::move(t);
  // The proof that the template writes what OpenSSL writes: one certificate
  // both ways, for a fresh key.
  Bytes pub(crypto_sign_PUBLICKEYBYTES);
  unsigned char sk[crypto_sign_SECRETKEYBYTES];
  crypto_sign_keypair(pub.data(), sk);
  sodium_memzero(sk, sizeof sk);
  auto same = template_agrees(pub, "d-" + to_hex(pub).substr(0, 20), now, int64_t{90} * 86400);
  if (!same || !*same) {
    template_.reset();
    log->warn("device CA: the certificate template differs from OpenSSL's certificate{}; OpenSSL builds each "
              "certificate",
              same ? "" : " (" + same.error().message + ")");
  }
}

Result<IssuedCertificate> DeviceCa::issue_from_template(const Bytes& subject_key, const std::string& cn,
                                                        int64_t now, int64_t lifetime_s, const Bytes& serial) const {
  const Template& t = *template_;
  if (subject_key.size() != 32) return make_error(Errc::invalid_argument, "an Ed25519 key has 32 bytes");
  const int64_t slack = std::min<int64_t>(300, lifetime_s / 10);
  const int64_t not_after = std::min(now + lifetime_s, issuer_not_after_);
  auto nb = der_time(now - slack);
  auto na = der_time(not_after);
  if (!nb || !na) return make_error(Errc::invalid_argument, "certificate validity beyond year 9999");
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_len = 0;
  if (EVP_Digest(subject_key.data(), subject_key.size(), digest, &digest_len, t.sha1, nullptr) != 1) {
    return ssl_fail("subject key identifier");
  }
  const std::string_view key(reinterpret_cast<const char*>(subject_key.data()), subject_key.size());

  std::string body;
  body.reserve(512);
  body.append("\xa0\x03\x02\x01\x02", 5);  // version 3
  body += der_unsigned(serial);
  body += kEd25519Alg;
  body += t.issuer_name;
  der_append(body, 0x30, *nb + *na);
  der_append(body, 0x30, der(0x31, der(0x30, std::string("\x06\x03\x55\x04\x03", 5) + der(0x0c, cn))));
  der_append(body, 0x30, std::string(kEd25519Alg) + der(0x03, std::string(1, '\0') + std::string(key)));
  std::string exts = t.exts_before_ski;
  exts += der(0x30, std::string("\x06\x03\x55\x1d\x0e", 5) +
                        der(0x04, der(0x04, std::string_view(reinterpret_cast<const char*>(digest), digest_len))));
  exts += t.exts_after_ski;
  der_append(body, 0xa3, der(0x30, exts));
  const std::string tbs = der(0x30, body);

  unsigned char sig[crypto_sign_BYTES];
  if (crypto_sign_detached(sig, nullptr, reinterpret_cast<const unsigned char*>(tbs.data()), tbs.size(), t.sk) != 0) {
    return make_error(Errc::internal, "sign certificate");
  }
  std::string cert_body = tbs;
  cert_body += kEd25519Alg;
  cert_body += der(0x03, std::string(1, '\0') + std::string(reinterpret_cast<const char*>(sig), sizeof sig));
  const std::string cert = der(0x30, cert_body);

  const std::string b64 = to_base64(reinterpret_cast<const uint8_t*>(cert.data()), cert.size());
  IssuedCertificate out;
  out.pem.reserve(b64.size() + b64.size() / 64 + 64);
  out.pem = "-----BEGIN CERTIFICATE-----\n";
  for (size_t i = 0; i < b64.size(); i += 64) {
    out.pem.append(b64, i, 64);
    out.pem.push_back('\n');
  }
  out.pem += "-----END CERTIFICATE-----\n";
  size_t lead = 0;
  while (lead + 1 < serial.size() && serial[lead] == 0) ++lead;
  out.serial_hex = to_hex(serial.data() + lead, serial.size() - lead);
  out.not_before_unix = now - slack;
  out.not_after_unix = not_after;
  return out;
}

Result<bool> DeviceCa::template_agrees(const Bytes& device_key, const std::string& cn, int64_t now_unix,
                                       int64_t lifetime_s) const {
  if (!template_) return false;
  PkeyPtr pub(EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, device_key.data(), device_key.size()));
  if (!pub) return ssl_fail("device key");
  const Bytes serial = random_serial_bytes();
  auto mine = issue_from_template(device_key, cn, now_unix, lifetime_s, serial);
  if (!mine) return mine.error();
  auto theirs = issue(pub.get(), cn, {}, false, now_unix, lifetime_s, serial);
  if (!theirs) return theirs.error();
  return mine->pem == theirs->pem && mine->serial_hex == theirs->serial_hex &&
         mine->not_before_unix == theirs->not_before_unix && mine->not_after_unix == theirs->not_after_unix;
}

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
  ca->make_template();
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
  ca->make_template();
  return ca;
}

Result<IssuedCertificate> DeviceCa::issue(EVP_PKEY* subject_key, const std::string& cn,
                                          const std::vector<std::string>& names, bool server, int64_t now,
                                          int64_t lifetime_s, const Bytes& serial_bytes) const {
  CertPtr cert(X509_new());
  IntPtr serial = to_asn1_integer(serial_bytes);
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
  if (!csr_signature_verifies(req.get(), csr_der, pub, device_key)) {
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
  const Bytes serial = random_serial_bytes();
  if (template_ && template_->fits(device_id)) {
    return issue_from_template(device_key, device_id, now_unix, lifetime_s, serial);
  }
  return issue(pub, device_id, {}, false, now_unix, lifetime_s, serial);
}

Result<IssuedCertificate> DeviceCa::issue_server(const std::vector<std::string>& names, int64_t now_unix,
                                                 int64_t lifetime_s) const {
  PkeyPtr key = new_ed25519();
  if (!key) return ssl_fail("server key");
  auto c = issue(key.get(), names.empty() ? std::string("flotilla-broker") : names.front(), names, true, now_unix,
                 lifetime_s, random_serial_bytes());
  if (!c) return c;
  c->key_pem = key_to_pem(key.get());
  return c;
}

Result<IssuedCertificate> DeviceCa::issue_client(const std::string& cn, int64_t now_unix, int64_t lifetime_s) const {
  PkeyPtr key = new_ed25519();
  if (!key) return ssl_fail("client key");
  auto c = issue(key.get(), cn, {}, false, now_unix, lifetime_s, random_serial_bytes());
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
