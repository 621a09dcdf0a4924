#include "flotilla/bundles/director.hpp"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>

namespace flotilla::bundles {

namespace {
constexpr std::string_view kContext = "flotilla-desired-header-v1\n";
}  // namespace

std::string desired_header_message(std::string_view header_bytes) {
  std::string m;
  m.reserve(kContext.size() + header_bytes.size());
  m.append(kContext);
  m.append(header_bytes);
  return m;
}

v1::SignedDesiredHeader sign_desired_header(const v1::DesiredHeader& header, const KeyPair& director) {
  v1::SignedDesiredHeader out;
  std::string bytes;
  {
    google::protobuf::io::StringOutputStream sos(&bytes);
    google::protobuf::io::CodedOutputStream cos(&sos);
    cos.SetSerializationDeterministic(true);
    header.SerializeToCodedStream(&cos);
  }
  const Bytes sig = sign_detached(director, desired_header_message(bytes));
  out.set_header(std::move(bytes));
  out.set_key_id(director.pub.key_id);
  out.set_signature(std::string(sig.begin(), sig.end()));
  return out;
}

HeaderVerdict verify_desired_header(const v1::SignedDesiredHeader& h, const PublicKey& director) {
  HeaderVerdict v;
  auto refuse = [&v](v1::Reason r, std::string msg) {
    v.reason = r;
    v.message = std::move(msg);
    return v;
  };
  if (h.signature().empty()) return refuse(v1::REASON_DESIRED_UNSIGNED, "the desired-state header carries no signature");
  if (h.header().size() > kMaxDesiredHeaderBytes) {
    return refuse(v1::REASON_MALFORMED_DESIRED, "the desired-state header is " + std::to_string(h.header().size()) +
                                                    " bytes, above the cap of " +
                                                    std::to_string(kMaxDesiredHeaderBytes));
  }
  if (h.key_id() != director.key_id) {
    return refuse(v1::REASON_DESIRED_BAD_SIGNATURE,
                  "the desired-state header is signed by key " + h.key_id().substr(0, 64) +
                      ", not by the director key this device pins (" + director.key_id + ")");
  }
  const Bytes sig(h.signature().begin(), h.signature().end());
  if (!verify_detached(director.key, desired_header_message(h.header()), sig)) {
    return refuse(v1::REASON_DESIRED_BAD_SIGNATURE,
                  "the desired-state header's signature by director key " + director.key_id + " does not verify");
  }
  if (!v.header.ParseFromString(h.header())) {
    return refuse(v1::REASON_MALFORMED_DESIRED, "the signed desired-state header does not parse");
  }
  return v;
}

}  // namespace flotilla::bundles
