// [unit] The check `flotilla cell crl-sync` makes before it gives a broker a
// revocation list (x509::check_crl_bundle): a table of lists it must refuse,
// each with its reason, beside the lists it must take. A refused list is
// never written (the CLI writes only after this check; the integration
// test in device_certs_test.cpp checks the file is unchanged).
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "flotilla/common/clock.hpp"
#include "flotilla/common/x509.hpp"
#include "flotilla/hub/device_ca.hpp"

using namespace flotilla;

TEST_CASE("a revocation list is taken only when its CA signed it, it has not expired and it is not older than the "
          "installed one",
          "[unit][certs]") {
  const int64_t now = SystemClock::instance().now_unix();
  auto ca = hub::DeviceCa::ephemeral(now);
  REQUIRE(ca);
  auto other = hub::DeviceCa::ephemeral(now);
  REQUIRE(other);
  const std::string trust = (*ca)->trust_pem();
  auto list = [&](hub::DeviceCa& by, hub::DeviceCa::Revoked revoked, int64_t issued, int64_t valid_s) {
    auto pem = by.crl_pem(revoked, issued, valid_s);
    REQUIRE(pem);
    return *pem;
  };
  const std::string current = list(**ca, {{"0a1b2c", now - 10}, {"0d0e", now - 5}}, now, 86400);
  const std::string hour_old = list(**ca, {}, now - 3600, 86400);

  // Positive controls: the hub's current list, over nothing or over an older one.
  auto fresh = x509::check_crl_bundle(current, trust, now, "");
  REQUIRE(fresh);
  REQUIRE_FALSE(fresh->empty());
  size_t revoked = 0;
  for (const auto& c : *fresh) {
    revoked += c.revoked;
    CHECK(c.next_update_unix > now);
    CHECK_FALSE(c.issuer.empty());
  }
  CHECK(revoked == 2 * fresh->size());  // every CA's list names every revoked serial
  CHECK(x509::check_crl_bundle(current, trust, now, hour_old));
  CHECK(x509::check_crl_bundle(current, trust, now, current));  // the same again: nothing older

  struct Case {
    const char* what;
    std::string crl, ca, installed;
    Errc code;
    const char* says;
  };
  std::string tampered = current;
  tampered.replace(tampered.find("-----END X509 CRL-----") - 20, 4, "AAAA");
  const std::vector<Case> cases = {
      {"signed by another CA", list(**other, {}, now, 86400), trust, "", Errc::refused, "not"},
      {"expired", list(**ca, {}, now - 3 * 86400, 86400), trust, "", Errc::refused, "expired at"},
      {"older than the one installed (a replay un-revokes)", hour_old, trust, current, Errc::refused,
       "before the one installed"},
      {"not a revocation list", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", trust, "",
       Errc::parse, "no PEM certificate revocation list"},
      {"no CA to check it against", current, "", "", Errc::invalid_argument, "no CA certificate"},
  };
  for (const auto& c : cases) {
    INFO(c.what);
    auto r = x509::check_crl_bundle(c.crl, c.ca, now, c.installed);
    REQUIRE_FALSE(r);
    INFO(r.error().message);
    CHECK(r.error().code == c.code);
    CHECK(r.error().message.find(c.says) != std::string::npos);
  }
  // A list whose signed bytes were changed is not taken, whatever the parser makes of it.
  CHECK_FALSE(x509::check_crl_bundle(tampered, trust, now, ""));
}
