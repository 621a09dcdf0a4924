// [unit] tests for bundles/selector: Kubernetes-style label selectors.
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "flotilla/bundles/selector.hpp"

namespace {

using flotilla::bundles::Labels;
using flotilla::bundles::Selector;

Selector parse_ok(const std::string& text) {
  auto s = Selector::parse(text);
  INFO("selector: '" << text << "' error: " << (s.ok() ? std::string() : s.error().message));
  REQUIRE(s.ok());
  return *s;
}

bool matches(const std::string& text, const Labels& labels) { return parse_ok(text).matches(labels); }

// Asserts the parse fails with an invalid_argument naming the selector and the reason.
void expect_parse_error(const std::string& text, const std::string& reason) {
  auto s = Selector::parse(text);
  INFO("selector: '" << text << "'");
  REQUIRE_FALSE(s.ok());
  CHECK(s.error().code == flotilla::Errc::invalid_argument);
  CHECK_THAT(s.error().message, Catch::Contains("selector"));
  CHECK_THAT(s.error().message, Catch::Contains(reason));
}

const Labels kBerlinProd = {{"env", "prod"}, {"site", "berlin"}, {"tier", "edge"}, {"gpu", "true"}};

}  // namespace

TEST_CASE("selector equality with = and ==", "[unit][selector]") {
  CHECK(matches("env=prod", kBerlinProd));
  CHECK(matches("env==prod", kBerlinProd));
  CHECK_FALSE(matches("env=dev", kBerlinProd));
  CHECK_FALSE(matches("env==dev", kBerlinProd));
  // Equality requires the label to exist.
  CHECK_FALSE(matches("region=eu", kBerlinProd));
  // Values compare exactly, not as prefixes.
  CHECK_FALSE(matches("env=pro", kBerlinProd));
  CHECK_FALSE(matches("env=production", kBerlinProd));

  auto s = parse_ok("env==prod");
  REQUIRE(s.requirements().size() == 1);
  CHECK(s.requirements()[0].key == "env");
  CHECK(s.requirements()[0].op == Selector::Op::equals);
  CHECK(s.requirements()[0].values == std::vector<std::string>{"prod"});
}

TEST_CASE("selector inequality matches other values and absent labels", "[unit][selector]") {
  CHECK_FALSE(matches("env!=prod", kBerlinProd));
  CHECK(matches("env!=dev", kBerlinProd));
  CHECK(matches("region!=eu", kBerlinProd));  // absent label matches, as in Kubernetes
  CHECK(parse_ok("env!=prod").requirements()[0].op == Selector::Op::not_equals);
}

TEST_CASE("selector set membership with in", "[unit][selector]") {
  CHECK(matches("site in (berlin,paris)", kBerlinProd));
  CHECK(matches("site in (paris,berlin)", kBerlinProd));
  CHECK(matches("site in (berlin)", kBerlinProd));
  CHECK_FALSE(matches("site in (paris,rome)", kBerlinProd));
  CHECK_FALSE(matches("region in (eu,us)", kBerlinProd));  // absent label does not match

  auto s = parse_ok("site in (berlin,paris)");
  REQUIRE(s.requirements().size() == 1);
  CHECK(s.requirements()[0].op == Selector::Op::in);
  CHECK(s.requirements()[0].values == std::vector<std::string>{"berlin", "paris"});
}

TEST_CASE("selector set exclusion with notin matches absent labels", "[unit][selector]") {
  CHECK_FALSE(matches("site notin (berlin)", kBerlinProd));
  CHECK_FALSE(matches("site notin (paris,berlin)", kBerlinProd));
  CHECK(matches("site notin (paris)", kBerlinProd));
  CHECK(matches("region notin (eu)", kBerlinProd));
  CHECK(parse_ok("site notin (x)").requirements()[0].op == Selector::Op::not_in);
}

TEST_CASE("selector existence and non-existence", "[unit][selector]") {
  CHECK(matches("gpu", kBerlinProd));
  CHECK_FALSE(matches("legacy", kBerlinProd));
  CHECK(matches("!legacy", kBerlinProd));
  CHECK_FALSE(matches("!gpu", kBerlinProd));
  CHECK(matches("! legacy", kBerlinProd));
  // Existence ignores the value, even an empty one.
  CHECK(matches("gpu", Labels{{"gpu", ""}}));
  CHECK(parse_ok("gpu").requirements()[0].op == Selector::Op::exists);
  CHECK(parse_ok("!gpu").requirements()[0].op == Selector::Op::not_exists);
}

TEST_CASE("selector requirements joined by commas must all hold", "[unit][selector]") {
  const std::string text = "env=prod,tier!=db,site in (berlin,paris),gpu,!legacy";
  auto s = parse_ok(text);
  CHECK(s.requirements().size() == 5);
  CHECK(s.matches(kBerlinProd));

  Labels with_legacy = kBerlinProd;
  with_legacy["legacy"] = "yes";
  CHECK_FALSE(s.matches(with_legacy));

  Labels db_tier = kBerlinProd;
  db_tier["tier"] = "db";
  CHECK_FALSE(s.matches(db_tier));

  Labels no_gpu = kBerlinProd;
  no_gpu.erase("gpu");
  CHECK_FALSE(s.matches(no_gpu));

  Labels rome = kBerlinProd;
  rome["site"] = "rome";
  CHECK_FALSE(s.matches(rome));
}

TEST_CASE("selector tolerates whitespace around keys, operators and values", "[unit][selector]") {
  auto s = parse_ok("  env = prod ,  tier != db ,site in ( berlin , paris ) , gpu ,  ! legacy  ");
  REQUIRE(s.requirements().size() == 5);
  CHECK(s.requirements()[0].key == "env");
  CHECK(s.requirements()[0].values == std::vector<std::string>{"prod"});
  CHECK(s.requirements()[2].values == std::vector<std::string>{"berlin", "paris"});
  CHECK(s.matches(kBerlinProd));
  CHECK(s.text() == "env = prod ,  tier != db ,site in ( berlin , paris ) , gpu ,  ! legacy");
  CHECK(matches("env\t==\tprod", kBerlinProd));
}

TEST_CASE("empty selector matches every device", "[unit][selector]") {
  for (const std::string text : {"", "   "}) {
    auto s = parse_ok(text);
    CHECK(s.requirements().empty());
    CHECK(s.matches(kBerlinProd));
    CHECK(s.matches(Labels{}));
  }
}

TEST_CASE("selector keys may carry a DNS prefix and values may be empty", "[unit][selector]") {
  const Labels labels = {{"example.com/role", "gateway"}, {"note", ""}};
  CHECK(matches("example.com/role=gateway", labels));
  CHECK(matches("note=", labels));
  CHECK_FALSE(matches("note=x", labels));
}

TEST_CASE("selector parse errors name the selector and the problem", "[unit][selector]") {
  expect_parse_error("site in (berlin,paris", "unbalanced '('");
  expect_parse_error("site in berlin,paris)", "unbalanced ')'");
  expect_parse_error("env=prod,,tier=edge", "empty requirement");
  expect_parse_error("env=prod,", "empty requirement");
  expect_parse_error(",env=prod", "empty requirement");
  expect_parse_error("-x", "bad label key '-x'");
  expect_parse_error("-x=1", "bad label key '-x'");
  expect_parse_error("env=prod west", "bad label value 'prod west'");
  expect_parse_error("site in (berlin,new york)", "bad value 'new york'");
  expect_parse_error("env=a=b", "bad label value 'a=b'");
  expect_parse_error("!", "bad label key ''");
  expect_parse_error("site in (berlin) extra", "expected a list");
  expect_parse_error("site in berlin", "expected a list");
  expect_parse_error("env=" + std::string(64, 'a'), "bad label value");
  // The message quotes the selector as written.
  auto s = Selector::parse("env=prod,,tier=edge");
  REQUIRE_FALSE(s.ok());
  CHECK_THAT(s.error().message, Catch::StartsWith("selector 'env=prod,,tier=edge'"));
}

TEST_CASE("selector label key and value validators", "[unit][selector]") {
  using flotilla::bundles::valid_label_key;
  using flotilla::bundles::valid_label_value;
  CHECK(valid_label_key("env"));
  CHECK(valid_label_key("example.com/role"));
  CHECK_FALSE(valid_label_key(""));
  CHECK_FALSE(valid_label_key("-env"));
  CHECK_FALSE(valid_label_key("has space"));
  CHECK_FALSE(valid_label_key(std::string(254, 'a')));
  CHECK(valid_label_value(""));
  CHECK(valid_label_value("v1.2_3-x"));
  CHECK_FALSE(valid_label_value("a/b"));
  CHECK_FALSE(valid_label_value(std::string(64, 'a')));
  CHECK(valid_label_value(std::string(63, 'a')));
}
