// Certificate requests the hub must refuse, at enrollment and at renewal
// (issue 16, docs/security.md "Device certificates"), over the real REST
// handler, a real HubService with an in-memory device CA and a real SQLite
// store: each refusal names what is wrong and stores nothing — no device
// row, no certificate row, no token use, no move of the renewal replay floor.
// And the revocation list: re-issued by the hub's clock before it expires.
#include <catch2/catch.hpp>

#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <cctype>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "flotilla/bundles/keys.hpp"
#include "flotilla/common/clock.hpp"
#include "flotilla/common/sqlite.hpp"
#include "flotilla/common/x509.hpp"
#include "flotilla/hub/api.hpp"
#include "flotilla/hub/device_ca.hpp"
#include "flotilla/hub/service.hpp"
#include "flotilla/hub/store.hpp"
#include "flotilla/v1/enroll.pb.h"
#include "tests/support/hub_test_support.hpp"
#include "tests/support/temp_dir.hpp"

namespace {

namespace bundles = flotilla::bundles;
namespace hub = flotilla::hub;
namespace v1 = flotilla::v1;
namespace x509 = flotilla::x509;
using flotilla::Bytes;
using flotilla::FakeClock;
using flotilla::test::body_of;
using flotilla::test::RecordingTransport;
using flotilla::test::TempDir;

// OpenSSL objects freed on every path.
struct PkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct ReqFree {
  void operator()(X509_REQ* p) const { X509_REQ_free(p); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;
using Req = std::unique_ptr<X509_REQ, ReqFree>;

Pkey ed25519_of(const bundles::KeyPair& k) {
  Pkey p(EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, k.secret.data(), 32));
  REQUIRE(p);
  return p;
}

// How a test request differs from the one a device sends.
struct CsrSpec {
  std::vector<std::pair<std::string, std::string>> subject;  // in order
  std::vector<std::string> requested_extensions;             // e.g. "basicConstraints=critical,CA:TRUE"
  std::string challenge_password;                            // a PKCS#9 attribute
};

// A PKCS#10 request (DER) for key, signed by key, made as the spec says.
std::string make_request(EVP_PKEY* key, const CsrSpec& spec) {
  Req req(X509_REQ_new());
  REQUIRE(req);
  REQUIRE(X509_REQ_set_version(req.get(), 0) == 1);
  X509_NAME* name = X509_REQ_get_subject_name(req.get());
  for (const auto& [field, value] : spec.subject) {
    REQUIRE(X509_NAME_add_entry_by_txt(name, field.c_str(), MBSTRING_UTF8,
                                       reinterpret_cast<const unsigned char*>(value.data()),
                                       static_cast<int>(value.size()), -1, 0) == 1);
  }
  REQUIRE(X509_REQ_set_pubkey(req.get(), key) == 1);
  if (!spec.requested_extensions.empty()) {
    STACK_OF(X509_EXTENSION)* exts = sk_X509_EXTENSION_new_null();
    for (const auto& e : spec.requested_extensions) {
      const auto eq = e.find('=');
      X509_EXTENSION* ext = X509V3_EXT_conf(nullptr, nullptr, e.substr(0, eq).c_str(), e.substr(eq + 1).c_str());
      REQUIRE(ext);
      sk_X509_EXTENSION_push(exts, ext);
    }
    REQUIRE(X509_REQ_add_extensions(req.get(), exts) == 1);
    sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
  }
  if (!spec.challenge_password.empty()) {
    REQUIRE(X509_REQ_add1_attr_by_NID(req.get(), NID_pkcs9_challengePassword, MBSTRING_UTF8,
                                      reinterpret_cast<const unsigned char*>(spec.challenge_password.c_str()),
                                      -1) == 1);
  }
  const int id = EVP_PKEY_get_id(key);
  REQUIRE(X509_REQ_sign(req.get(), key, id == EVP_PKEY_ED25519 ? nullptr : EVP_sha256()) > 0);
  unsigned char* der = nullptr;
  const int n = i2d_X509_REQ(req.get(), &der);
  REQUIRE(n > 0);
  std::string out(reinterpret_cast<char*>(der), static_cast<size_t>(n));
  OPENSSL_free(der);
  return out;
}

std::string pem_of(const std::string& der) {
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  Req req(d2i_X509_REQ(nullptr, &p, static_cast<long>(der.size())));
  REQUIRE(req);
  BIO* bio = BIO_new(BIO_s_mem());
  REQUIRE(PEM_write_bio_X509_REQ(bio, req.get()) == 1);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio, &data);
  std::string out(data, static_cast<size_t>(n));
  BIO_free(bio);
  return out;
}

// One request the hub must refuse, and the words its refusal must say.
struct BadCsr {
  std::string what;
  std::string csr;
  std::string message;
};

// Every kind of request the hub refuses, for the device with key k (id).
std::vector<BadCsr> bad_requests(const bundles::KeyPair& k, const std::string& id) {
  Pkey mine = ed25519_of(k);
  const CsrSpec good{{{"CN", id}}, {}, {}};
  const std::string valid = make_request(mine.get(), good);
  std::vector<BadCsr> out;

  // Size: a request of 5 KiB is refused before it is parsed. Made real
  // (250 requested names), so only its size is wrong at first sight.
  CsrSpec big = good;
  std::string names;
  for (int i = 0; i < 250; ++i) names += (i ? "," : "") + std::string("DNS:name-") + std::to_string(i) + ".example.test";
  big.requested_extensions = {"subjectAltName=" + names};
  const std::string oversized = make_request(mine.get(), big);
  REQUIRE(oversized.size() > x509::kMaxCsrBytes);
  out.push_back({"an oversized request", oversized, "at most 4096"});

  // Another key than the device's identity key, Ed25519 or not.
  const auto other = bundles::generate_key();
  out.push_back({"a request for another Ed25519 key", make_request(ed25519_of(other).get(), good),
                 "csr is for another key than the device's identity key"});
  Pkey p256(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
  REQUIRE(p256);
  out.push_back({"a request for a P-256 key", make_request(p256.get(), good),
                 "csr must be for the device's Ed25519 identity key"});

  // The subject: exactly CN=<device id>.
  const std::string subject_msg = "csr subject must be exactly CN=" + id;
  out.push_back({"another device's CN", make_request(mine.get(), {{{"CN", "d-00000000000000000000"}}, {}, {}}),
                 subject_msg});
  out.push_back({"the hub's own CN", make_request(mine.get(), {{{"CN", "flotilla-hub"}}, {}, {}}), subject_msg});
  out.push_back({"an extra O field", make_request(mine.get(), {{{"O", "Flotilla"}, {"CN", id}}, {}, {}}), subject_msg});
  out.push_back({"two CNs", make_request(mine.get(), {{{"CN", id}, {"CN", "flotilla-hub"}}, {}, {}}), subject_msg});
  out.push_back({"the id as another field", make_request(mine.get(), {{{"OU", id}}, {}, {}}), subject_msg});
  out.push_back({"an empty subject", make_request(mine.get(), {{}, {}, {}}), subject_msg});
  out.push_back({"the CN with a trailing NUL", make_request(mine.get(), {{{"CN", id + std::string(1, '\0')}}, {}, {}}),
                 subject_msg});

  // Attributes: requested extensions (a CA, a server, other names) or any other.
  const std::string attr_msg = "csr must not carry attributes or requested extensions";
  for (const std::string ext : {"basicConstraints=critical,CA:TRUE", "extendedKeyUsage=serverAuth",
                                "subjectAltName=DNS:broker.example.test", "keyUsage=critical,keyCertSign"}) {
    out.push_back({"a requested extension " + ext, make_request(mine.get(), {{{"CN", id}}, {ext}, {}}), attr_msg});
  }
  out.push_back({"a challengePassword attribute", make_request(mine.get(), {{{"CN", id}}, {}, "s3cret"}), attr_msg});

  // The self-signature: the last byte of the signature flipped; the
  // subject changed after signing (the signature covers the old one).
  std::string flipped = valid;
  flipped.back() = static_cast<char>(flipped.back() ^ 0x01);
  out.push_back({"a flipped signature bit", flipped, "csr signature does not verify"});
  {
    std::string resigned = valid;
    // The CN's value is in the signed part: change one character of it.
    const auto at = resigned.find(id);
    REQUIRE(at != std::string::npos);
    resigned[at + id.size() - 1] = resigned[at + id.size() - 1] == '0' ? '1' : '0';
    out.push_back({"the subject changed after signing", resigned, "csr signature does not verify"});
  }

  // Not one DER request.
  const std::string not_der = "csr is not one DER PKCS#10 certificate request";
  out.push_back({"garbage bytes", std::string("\x30\x82\xff\xff garbage that is not DER at all", 33), not_der});
  out.push_back({"the request in PEM, not DER", pem_of(valid), not_der});
  out.push_back({"a valid request with bytes after it", valid + std::string("\x00\x00", 2), not_der});
  out.push_back({"two valid requests", valid + valid, not_der});
  out.push_back({"a truncated request", valid.substr(0, valid.size() - 10), not_der});
  out.push_back({"a DER SEQUENCE that is no request", std::string("\x30\x03\x02\x01\x01", 5), not_der});
  return out;
}

// A hub with a device CA and no broker process: the REST handler over a
// real service and store, with a recording transport (the hub refuses
// enrollment until it listens to device reports).
class CertHub {
 public:
  CertHub() {
    auto ca = hub::DeviceCa::ephemeral(clock.now_unix());
    REQUIRE(ca);
    ca_ = std::move(*ca);
    auto s = hub::Store::open((dir_.path() / "hub.db").string());
    REQUIRE(s);
    store_ = std::move(*s);
    hub::ServiceConfig cfg;
    cfg.broker_url = "ssl://127.0.0.1:8883";
    cfg.public_url = "https://hub.test:8443";
    cfg.engine_thread = false;
    cfg.device_ca = ca_.get();
    cfg.ca_certificates = ca_->trust_pem();
    service_ = std::make_unique<hub::HubService>(*store_, clock, cfg);
    REQUIRE(service_->attach_transport(transport_));
    // No rate limits: these tests send dozens of requests at one instant of the fake clock.
    api_ = std::make_unique<hub::Api>(*service_, hub::ApiLimits{0, 0});
  }

  hub::HubService& service() { return *service_; }
  hub::Store& store() { return *store_; }
  const hub::DeviceCa& ca() const { return *ca_; }

  // A single-use enrollment token; returns its secret and its id.
  std::pair<std::string, std::string> token(int64_t max_uses = 1) {
    hub::TokenRecord rec;
    rec.name = "csr-test";
    rec.role = "enroll";
    rec.max_uses = max_uses;
    auto t = service_->create_token("enroll", rec);
    REQUIRE(t);
    return {t->secret, t->record.id};
  }

  hub::HttpResponse post(const std::string& target, const std::string& body) {
    hub::HttpRequest req;
    req.method = "POST";
    req.target = target;
    req.body = body;
    req.peer = "127.0.0.1";
    return api_->handle(req);
  }

  hub::HttpResponse enroll(const std::string& token, const bundles::KeyPair& k, const std::string& csr) {
    v1::EnrollRequest req;
    req.set_enrollment_token(token);
    req.set_device_public_key(std::string(k.pub.key.begin(), k.pub.key.end()));
    req.set_issued_unix_ms(++issued_);
    const Bytes proof = bundles::sign_detached(k, bundles::enroll_proof_message(token, k.pub.key, issued_));
    req.set_proof(std::string(proof.begin(), proof.end()));
    req.set_hostname("csr-test");
    req.set_arch("amd64");
    req.set_csr(csr);
    return post("/v1/enroll", req.SerializeAsString());
  }

  // A renewal with a valid proof by the device's key over this very csr.
  hub::HttpResponse renew(const bundles::KeyPair& k, const std::string& csr, uint64_t issued_ms) {
    v1::RenewRequest rr;
    rr.set_device_id(bundles::device_id_for_key(k.pub.key));
    rr.set_csr(csr);
    rr.set_issued_unix_ms(issued_ms);
    const Bytes proof = bundles::sign_detached(k, bundles::renew_proof_message(rr.device_id(), csr, issued_ms));
    rr.set_proof(std::string(proof.begin(), proof.end()));
    return post("/v1/renew", rr.SerializeAsString());
  }

  int64_t count(const std::string& table) {
    auto n = flotilla::sql::query<int64_t>(store_->db(), "SELECT COUNT(*) FROM " + table,
                                           [](const flotilla::sql::Stmt& s) { return s.col_int(0); });
    REQUIRE(n);
    return n->at(0);
  }
  int64_t token_uses(const std::string& id) {
    auto t = store_->get_token("enroll", id);
    REQUIRE(t);
    REQUIRE(*t);
    return (*t)->uses;
  }
  uint64_t replay_floor(const std::string& device_id) {
    auto d = store_->get_device(device_id);
    REQUIRE(d);
    REQUIRE(*d);
    return (*d)->enroll_issued_ms;
  }
  uint64_t last_issued() const { return issued_; }

  FakeClock clock;

 private:
  TempDir dir_;
  std::unique_ptr<hub::DeviceCa> ca_;
  std::unique_ptr<hub::Store> store_;
  RecordingTransport transport_;
  std::unique_ptr<hub::HubService> service_;
  std::unique_ptr<hub::Api> api_;
  uint64_t issued_ = 1'800'000'000'000;
};

std::string message_of(const hub::HttpResponse& r) {
  const auto j = body_of(r);
  REQUIRE(j.contains("error"));
  return j["error"]["message"].get<std::string>();
}

}  // namespace

TEST_CASE("enrollment refuses every malformed or foreign certificate request and stores nothing",
          "[unit][hub][security][certs]") {
  CertHub hub;
  const auto k = bundles::generate_key();
  const std::string id = bundles::device_id_for_key(k.pub.key);
  const auto [secret, token_id] = hub.token(1);
  for (const auto& bad : bad_requests(k, id)) {
    INFO(bad.what);
    const auto r = hub.enroll(secret, k, bad.csr);
    INFO(r.body);
    CHECK(r.status == 400);
    CHECK(body_of(r)["error"]["code"] == "invalid_argument");
    CHECK(message_of(r).find(bad.message) != std::string::npos);
    // Nothing stored, nothing spent: the single-use token still enrolls the device below.
    CHECK(hub.count("devices") == 0);
    CHECK(hub.count("device_certs") == 0);
    CHECK(hub.token_uses(token_id) == 0);
  }
  // No request at all, where the broker takes certificates only.
  {
    const auto r = hub.enroll(secret, k, "");
    CHECK(r.status == 400);
    CHECK(message_of(r).find("carries no csr") != std::string::npos);
    CHECK(hub.count("devices") == 0);
    CHECK(hub.token_uses(token_id) == 0);
  }

  // The refusals were about the requests: the device's own request, with
  // the same single-use token, is taken, and its certificate is the hub's
  // making for exactly that key and id.
  const auto ok = hub.enroll(secret, k, *x509::make_csr(k.secret, id));
  INFO(ok.body);
  REQUIRE(ok.status == 200);
  v1::EnrollResponse resp;
  REQUIRE(resp.ParseFromString(ok.body));
  CHECK(resp.device_id() == id);
  auto info = x509::parse_certificate_pem(resp.client_certificate());
  REQUIRE(info);
  CHECK(info->subject_cn == id);
  CHECK(info->ed25519_public_key == k.pub.key);
  CHECK(x509::verify_certificate(resp.client_certificate(), hub.ca().trust_pem()));
  CHECK(hub.count("devices") == 1);
  CHECK(hub.count("device_certs") == 1);
  CHECK(hub.token_uses(token_id) == 1);
}

TEST_CASE("renewal refuses every malformed or foreign certificate request and changes nothing",
          "[unit][hub][security][certs]") {
  CertHub hub;
  const auto k = bundles::generate_key();
  const std::string id = bundles::device_id_for_key(k.pub.key);
  const auto tok = hub.token(1);
  REQUIRE(hub.enroll(tok.first, k, *x509::make_csr(k.secret, id)).status == 200);
  const uint64_t floor = hub.replay_floor(id);
  REQUIRE(floor == hub.last_issued());
  REQUIRE(hub.count("device_certs") == 1);

  // Each refused request is newer than the last: had any of them moved the
  // replay floor, the renewal at the end (floor + 1) would be refused.
  uint64_t issued = floor + 1000;
  for (const auto& bad : bad_requests(k, id)) {
    INFO(bad.what);
    const auto r = hub.renew(k, bad.csr, ++issued);
    INFO(r.body);
    CHECK(r.status == 400);
    CHECK(message_of(r).find(bad.message) != std::string::npos);
    CHECK(hub.count("device_certs") == 1);
    CHECK(hub.replay_floor(id) == floor);
  }
  {
    const auto r = hub.renew(k, "", ++issued);
    CHECK(r.status == 400);
    CHECK(message_of(r).find("csr is empty") != std::string::npos);
    CHECK(hub.count("device_certs") == 1);
    CHECK(hub.replay_floor(id) == floor);
  }
  // A proof over another request than the one sent: refused before the request is looked at.
  {
    v1::RenewRequest rr;
    rr.set_device_id(id);
    rr.set_csr(*x509::make_csr(k.secret, id));
    rr.set_issued_unix_ms(++issued);
    const Bytes proof = bundles::sign_detached(k, bundles::renew_proof_message(id, "another request", issued));
    rr.set_proof(std::string(proof.begin(), proof.end()));
    const auto r = hub.post("/v1/renew", rr.SerializeAsString());
    CHECK(r.status == 400);
    CHECK(message_of(r).find("renewal proof does not verify") != std::string::npos);
    CHECK(hub.count("device_certs") == 1);
    CHECK(hub.replay_floor(id) == floor);
  }

  const auto ok = hub.renew(k, *x509::make_csr(k.secret, id), floor + 1);
  INFO(ok.body);
  REQUIRE(ok.status == 200);
  v1::RenewResponse resp;
  REQUIRE(resp.ParseFromString(ok.body));
  auto info = x509::parse_certificate_pem(resp.client_certificate());
  REQUIRE(info);
  CHECK(info->ed25519_public_key == k.pub.key);
  CHECK(hub.count("device_certs") == 2);
  CHECK(hub.replay_floor(id) == floor + 1);
}

namespace {

struct CrlFree {
  void operator()(X509_CRL* p) const { X509_CRL_free(p); }
};
struct CertFree {
  void operator()(X509* p) const { X509_free(p); }
};

// What a broker reads from the first list of a CRL PEM text: when it runs
// out, which serials it names, and whether the CA signed it.
struct CrlFacts {
  int64_t next_update = 0;
  std::vector<std::string> serials;
  bool signed_by_ca = false;
};

CrlFacts read_crl(const std::string& pem, const std::string& ca_pem) {
  BIO* b = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  std::unique_ptr<X509_CRL, CrlFree> crl(PEM_read_bio_X509_CRL(b, nullptr, nullptr, nullptr));
  BIO_free(b);
  REQUIRE(crl);
  BIO* cb = BIO_new_mem_buf(ca_pem.data(), static_cast<int>(ca_pem.size()));
  std::unique_ptr<X509, CertFree> ca(PEM_read_bio_X509(cb, nullptr, nullptr, nullptr));
  BIO_free(cb);
  REQUIRE(ca);
  CrlFacts f;
  std::tm tm{};
  REQUIRE(ASN1_TIME_to_tm(X509_CRL_get0_nextUpdate(crl.get()), &tm) == 1);
  f.next_update = static_cast<int64_t>(::timegm(&tm));
  STACK_OF(X509_REVOKED)* revoked = X509_CRL_get_REVOKED(crl.get());
  for (int i = 0; i < sk_X509_REVOKED_num(revoked); ++i) {
    BIGNUM* bn = ASN1_INTEGER_to_BN(X509_REVOKED_get0_serialNumber(sk_X509_REVOKED_value(revoked, i)), nullptr);
    char* hex = BN_bn2hex(bn);
    std::string s(hex);
    OPENSSL_free(hex);
    BN_free(bn);
    for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    f.serials.push_back(s);
  }
  f.signed_by_ca = X509_CRL_verify(crl.get(), X509_get0_pubkey(ca.get())) == 1;
  return f;
}

}  // namespace

TEST_CASE("the revocation list is re-issued by the hub's clock before it runs out, and forgets expired certificates",
          "[unit][hub][security][certs]") {
  CertHub hub;
  const auto k = bundles::generate_key();
  const std::string id = bundles::device_id_for_key(k.pub.key);
  const auto tok = hub.token(1);
  const auto enrolled = hub.enroll(tok.first, k, *x509::make_csr(k.secret, id));
  REQUIRE(enrolled.status == 200);
  v1::EnrollResponse resp;
  REQUIRE(resp.ParseFromString(enrolled.body));
  const auto cert = x509::parse_certificate_pem(resp.client_certificate());
  REQUIRE(cert);
  // Revoked (as a decommission does), then the list the hub starts with.
  REQUIRE(hub.store().revoke_device_certs(id, hub.clock.now_unix_ms()));
  REQUIRE(hub.service().sync_broker_revocations());
  const int64_t start = hub.clock.now_unix();
  CrlFacts first = read_crl(hub.service().crl_pem(), hub.ca().issuer_pem());
  CHECK(first.next_update == start + hub::HubService::kCrlValiditySeconds);
  CHECK(first.serials == std::vector<std::string>{cert->serial_hex});
  CHECK(first.signed_by_ca);

  // 120 days of upkeep every 30 minutes (the hub runs it every few
  // minutes). The list in force never runs out, is re-made only when 20 of
  // its 30 days are left (a reload every ten days, not at every pass), keeps
  // naming the revoked certificate until that expires, then forgets it.
  std::string served = hub.service().crl_pem();
  int reissued = 0;
  int64_t last_reissue = start;
  for (int64_t t = start; t < start + int64_t{120} * 86400; t += 1800) {
    hub.clock.set_unix(t);
    hub.service().maintain_certificates();
    const std::string now_served = hub.service().crl_pem();
    const CrlFacts f = read_crl(now_served, hub.ca().issuer_pem());
    INFO("day " << (t - start) / 86400.0);
    REQUIRE(f.next_update > t);
    REQUIRE(f.next_update - t >= int64_t{20} * 86400 - 1800);
    REQUIRE(f.signed_by_ca);
    if (now_served != served) {
      ++reissued;
      CHECK(t - last_reissue >= int64_t{10} * 86400 - 1800);
      last_reissue = t;
      served = now_served;
    }
    if (t < cert->not_after_unix) {
      REQUIRE(f.serials == std::vector<std::string>{cert->serial_hex});
    } else if (t > cert->not_after_unix + 86400 + int64_t{10} * 86400) {
      // Pruned a day after expiry; the next list made (at most ten days on) no longer names it.
      REQUIRE(f.serials.empty());
    }
  }
  CHECK(reissued >= 11);
  CHECK(reissued <= 12);
  CHECK(hub.count("device_certs") == 0);
}

namespace {

// A certificate from PEM, its issuer's verdict on its signature, its CN.
struct IssuedFacts {
  bool signed_by_ca = false;
  std::string cn;
  bool client_auth_only = false;
};

IssuedFacts facts_of(const std::string& cert_pem, const std::string& ca_pem) {
  auto read = [](const std::string& pem) {
    BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
    X509* c = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
    BIO_free(bio);
    return c;
  };
  X509* cert = read(cert_pem);
  X509* ca = read(ca_pem);
  REQUIRE(cert);
  REQUIRE(ca);
  IssuedFacts f;
  f.signed_by_ca = X509_verify(cert, X509_get0_pubkey(ca)) == 1 && X509_check_issued(ca, cert) == X509_V_OK;
  char cn[256] = {0};
  X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn, sizeof cn);
  f.cn = cn;
  f.client_auth_only = X509_check_purpose(cert, X509_PURPOSE_SSL_CLIENT, 0) == 1 &&
                       X509_check_purpose(cert, X509_PURPOSE_SSL_SERVER, 0) != 1 && X509_check_ca(cert) == 0;
  X509_free(cert);
  X509_free(ca);
  return f;
}

// A self-signed CA of the given key (an operator's), written as PEM files.
void write_operator_ca(EVP_PKEY* key, const std::string& cert_file, const std::string& key_file) {
  X509* cert = X509_new();
  REQUIRE(cert);
  X509_set_version(cert, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert), 7);
  X509_NAME* name = X509_get_subject_name(cert);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>("Operator CA"), -1, -1,
                             0);
  X509_set_issuer_name(cert, name);
  X509_gmtime_adj(X509_getm_notBefore(cert), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert), 3650L * 86400);
  X509_set_pubkey(cert, key);
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, cert, cert, nullptr, nullptr, 0);
  for (const auto& [nid, value] : {std::pair{NID_basic_constraints, "critical,CA:TRUE"},
                                   std::pair{NID_key_usage, "critical,keyCertSign,cRLSign"},
                                   std::pair{NID_subject_key_identifier, "hash"}}) {
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
    REQUIRE(ext);
    X509_add_ext(cert, ext, -1);
    X509_EXTENSION_free(ext);
  }
  REQUIRE(X509_sign(cert, key, EVP_PKEY_get_id(key) == EVP_PKEY_ED25519 ? nullptr : EVP_sha256()) > 0);
  auto write = [](const std::string& file, auto&& pem) {
    FILE* f = std::fopen(file.c_str(), "w");
    REQUIRE(f);
    REQUIRE(pem(f) == 1);
    std::fclose(f);
  };
  write(cert_file, [&](FILE* f) { return PEM_write_X509(f, cert); });
  write(key_file, [&](FILE* f) { return PEM_write_PrivateKey(f, key, nullptr, nullptr, 0, nullptr, nullptr); });
  REQUIRE(::chmod(key_file.c_str(), 0600) == 0);
  X509_free(cert);
}

}  // namespace

// Device certificates are written from a DER template and signed with the
// CA's Ed25519 key by libsodium (the enrollment rate, issue 16); they must
// be the very bytes OpenSSL's builder makes, for every name and time a
// device can have: names of 1 to 64 characters of every printable kind,
// UTCTime and GeneralizedTime on both sides of 2050, lifetimes cut at the
// CA's end.
TEST_CASE("device certificates from the template are byte for byte OpenSSL's", "[unit]") {
  const int64_t y2049_end = 2524607999;  // 2049-12-31T23:59:59Z, the last UTCTime
  const std::vector<int64_t> nows = {1700000000, 1764800000, y2049_end - 3600, y2049_end, y2049_end + 1,
                                     y2049_end + 86400 * 400};
  std::string all_printable;
  for (char c = 0x20; c < 0x7f; ++c) all_printable.push_back(c);
  const std::vector<std::string> names = {"d-0123456789abcdef0123", "a", std::string(64, 'z'),
                                          all_printable.substr(0, 64), all_printable.substr(31, 64),
                                          "gw*1@site \\ 'quoted' & <x>"};
  const std::vector<int64_t> lifetimes = {60, 3600, int64_t{90} * 86400, int64_t{20} * 365 * 86400};
  int compared = 0;
  for (const int64_t now : nows) {
    auto ca = hub::DeviceCa::ephemeral(now);
    REQUIRE(ca);
    REQUIRE((*ca)->uses_template());
    for (const auto& name : names) {
      for (const int64_t life : lifetimes) {
        const auto key = bundles::generate_key();
        INFO("now " << now << ", CN '" << name << "', lifetime " << life);
        auto same = (*ca)->template_agrees(key.pub.key, name, now, life);
        REQUIRE(same);
        CHECK(*same);
        ++compared;
      }
    }
    // And what enrollment hands out verifies under the CA, names the device
    // and serves as a TLS client only.
    const auto key = bundles::generate_key();
    const std::string id = bundles::device_id_for_key(key.pub.key);
    auto issued = (*ca)->issue_for_csr(x509::make_csr(key.secret, id).value(), key.pub.key, id, now, 86400);
    REQUIRE(issued);
    const IssuedFacts f = facts_of(issued->pem, (*ca)->issuer_pem());
    CHECK(f.signed_by_ca);
    CHECK(f.cn == id);
    CHECK(f.client_auth_only);
    CHECK(issued->serial_hex.size() == 32);
  }
  CHECK(compared == static_cast<int>(nows.size() * names.size() * lifetimes.size()));
}

// An operator's CA: Ed25519 gets the template; P-256 keeps OpenSSL's builder
// (an ECDSA signature over SHA-256) and its certificates verify as well.
TEST_CASE("an operator's device CA issues with or without the template by its key type", "[unit]") {
  TempDir dir;
  const int64_t now = static_cast<int64_t>(std::time(nullptr));
  for (const std::string type : {"ED25519", "P-256"}) {
    INFO(type);
    Pkey key(type == "ED25519" ? EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519")
                               : EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
    REQUIRE(key);
    const auto sub = dir.path() / type;
    std::filesystem::create_directories(sub / "ca");
    hub::DeviceCaConfig cfg;
    cfg.dir = sub / "ca";
    cfg.cert_file = (sub / "op.pem").string();
    cfg.key_file = (sub / "op.key").string();
    write_operator_ca(key.get(), cfg.cert_file, cfg.key_file);
    auto ca = hub::DeviceCa::open(cfg, now);
    REQUIRE(ca);
    CHECK((*ca)->uses_template() == (type == "ED25519"));
    const auto dev = bundles::generate_key();
    const std::string id = bundles::device_id_for_key(dev.pub.key);
    auto issued = (*ca)->issue_for_csr(x509::make_csr(dev.secret, id).value(), dev.pub.key, id, now, 86400);
    REQUIRE(issued);
    const IssuedFacts f = facts_of(issued->pem, (*ca)->issuer_pem());
    CHECK(f.signed_by_ca);
    CHECK(f.cn == id);
    CHECK(f.client_auth_only);
  }
}
