// SentencePiece behind a wall: Debian's sentencepiece 0.1.97 headers declare
// `namespace absl { using std::string_view; }`, which clashes with Debian's real Abseil
// (absl::string_view is its own class there). So only spm_backend.cpp includes them, and it
// includes no Abseil header; this interface uses the standard library only.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace dmc::data::spm {

class Model {
 public:
  // Loads a .model file; on failure returns null and sets *error.
  static std::unique_ptr<Model> Load(const std::string& path, std::string* error);
  ~Model();

  // Thread-safe (SentencePieceProcessor::Encode is const).
  bool Encode(std::string_view text, std::vector<int32_t>* ids, std::string* error) const;
  std::string Decode(const std::vector<int32_t>& ids) const;
  int vocab_size() const;
  int bos_id() const;
  int eos_id() const;
  int pad_id() const;

 private:
  Model() = default;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> p_;
};

// SentencePieceTrainer::Train with a command-line style argument string ("--input=... ...").
// Returns false and sets *error on failure.
bool Train(const std::string& args, std::string* error);

}  // namespace dmc::data::spm
