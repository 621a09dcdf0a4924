#pragma once
// Errors are values. Result<T> holds either a T or an Error carrying a code,
// a message with context, and whether retrying can help.
#include <cassert>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace flotilla {

enum class Errc {
  invalid_argument,
  not_found,
  already_exists,
  permission_denied,
  unauthenticated,
  io,
  parse,
  crypto,
  timeout,
  unavailable,
  too_large,
  conflict,
  refused,
  internal,
  // The coordination store (etcd) cannot be reached: the API answers 503
  // naming it, and nothing was written (docs/adr/0014).
  coordination_unavailable,
};

std::string_view errc_name(Errc code);

struct Error {
  Errc code = Errc::internal;
  std::string message;
  bool retryable = false;

  // Prefixes the message with what the caller was doing: "enroll: connect: refused".
  Error with_context(std::string_view context) const {
    Error e = *this;
    e.message = std::string(context) + ": " + message;
    return e;
  }
  std::string describe() const;
};

inline Error make_error(Errc code, std::string message, bool retryable = false) {
  return Error{code, std::move(message), retryable};
}

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT
  Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}  // NOLINT

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & { assert(ok()); return std::get<0>(v_); }
  const T& value() const& { assert(ok()); return std::get<0>(v_); }
  T&& value() && { assert(ok()); return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const Error& error() const { assert(!ok()); return std::get<1>(v_); }

  T value_or(T fallback) const { return ok() ? std::get<0>(v_) : std::move(fallback); }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)), ok_(false) {}  // NOLINT
  bool ok() const { return ok_; }
  explicit operator bool() const { return ok_; }
  const Error& error() const { assert(!ok_); return error_; }

 private:
  Error error_;
  bool ok_ = true;
};

using Status = Result<void>;

}  // namespace flotilla

// Propagates an error from an expression returning Result<...>.
#define FLOTILLA_TRY_STATUS(expr)                       \
  do {                                                  \
    auto flotilla_try_r_ = (expr);                      \
    if (!flotilla_try_r_.ok()) return flotilla_try_r_.error(); \
  } while (0)
