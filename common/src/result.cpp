#include "flotilla/common/result.hpp"

namespace flotilla {

std::string_view errc_name(Errc code) {
  switch (code) {
    case Errc::invalid_argument: return "invalid_argument";
    case Errc::not_found: return "not_found";
    case Errc::already_exists: return "already_exists";
    case Errc::permission_denied: return "permission_denied";
    case Errc::unauthenticated: return "unauthenticated";
    case Errc::io: return "io";
    case Errc::parse: return "parse";
    case Errc::crypto: return "crypto";
    case Errc::timeout: return "timeout";
    case Errc::unavailable: return "unavailable";
    case Errc::too_large: return "too_large";
    case Errc::conflict: return "conflict";
    case Errc::refused: return "refused";
    case Errc::internal: return "internal";
    case Errc::coordination_unavailable: return "coordination_unavailable";
  }
  return "internal";
}

std::string Error::describe() const {
  return std::string(errc_name(code)) + ": " + message;
}

}  // namespace flotilla
