// SHA-256 (FIPS 180-4), used to name a SentencePiece model by the hash of its file so that shards
// record exactly which tokenizer made them.
#pragma once

#include <string>
#include <string_view>

namespace dmc::data {

// Lower-case hex digest of `bytes`.
std::string Sha256Hex(std::string_view bytes);

}  // namespace dmc::data
