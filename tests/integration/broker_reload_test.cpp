// The embedded broker's password-file reload under a burst of changes:
// mosquitto drops a SIGHUP that arrives while it is reloading, so
// set_device_credentials must not return before the new file is in force.
#include <catch2/catch.hpp>

#include "flotilla/common/transport.hpp"
#include "flotilla/hub/broker.hpp"
#include "tests/support/harness.hpp"

using namespace flotilla;
using namespace flotilla::test;

namespace {

Status login(const hub::EmbeddedBroker& b, const std::string& user, const std::string& password) {
  auto t = transport::make_paho_transport();
  transport::ConnectOptions co;
  co.url = b.url();
  co.client_id = user;
  co.username = user;
  co.password = password;
  co.clean_session = true;
  co.timeout = std::chrono::seconds(3);
  auto s = t->connect(co);
  if (s) t->disconnect();
  return s;
}

}  // namespace

TEST_CASE("every credential change is in force when set_device_credentials returns, even in a burst",
          "[integration][broker]") {
  TempDir tmp;
  hub::BrokerConfig cfg;
  cfg.dir = tmp.path() / "broker";
  // Password reloads remain for dev-plain-mqtt and for devices enrolled
  // before certificates (until they renew).
  cfg.auth = hub::BrokerAuth::password;
  auto broker = hub::EmbeddedBroker::start(cfg, {});
  REQUIRE(broker);
  hub::EmbeddedBroker& b = **broker;

  hub::EmbeddedBroker::Credentials creds;
  std::vector<std::string> passwords;
  auto add = [&](const std::string& user) {
    passwords.push_back("pw-" + user + "-" + std::to_string(::getpid()));
    creds.emplace_back(user, hub::mosquitto_password_hash(passwords.back(), 2));
  };
  // Rounds of back-to-back changes, as a burst of enrollments makes them.
  // The newest account must work at once, with no retry. (The lost-SIGHUP
  // race itself needs a loaded broker to show; the 20-agent campaign tests
  // hit it when run side by side.)
  int refused = 0;
  for (int round = 0; round < 10; ++round) {
    for (int k = 0; k < 3; ++k) {
      add("d-burst" + std::to_string(round) + "-" + std::to_string(k));
      REQUIRE(b.set_device_credentials(creds));
    }
    auto s = login(b, creds.back().first, passwords.back());
    if (!s) {
      ++refused;
      UNSCOPED_INFO("round " << round << ": " << s.error().message);
    }
  }
  CHECK(refused == 0);
  // Removing an account takes effect before the call returns too.
  const auto removed = creds.back();
  creds.pop_back();
  REQUIRE(b.set_device_credentials(creds));
  auto gone = login(b, removed.first, passwords.back());
  REQUIRE_FALSE(gone);
  CHECK(gone.error().code == Errc::unauthenticated);
  CHECK(login(b, creds.front().first, passwords.front()));
  // The probe account's password is never a stable secret: an old one is refused.
  CHECK_FALSE(login(b, hub::kReloadProbeUser, "guess"));
}
