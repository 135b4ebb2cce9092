// Tokenizers: the built-in byte-level one (no model file) and SentencePiece (Llama 1/2
// tokenizer.model, or one trained with spm_train on our own corpus).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dmc::data {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Plain text -> ids, without BOS/EOS (dmc-prep appends EOS after each document).
  // Thread-safe: dmc-prep calls it from several threads.
  virtual std::vector<int32_t> Encode(std::string_view text) const = 0;
  // ids -> text; special and out-of-range ids are dropped.
  virtual std::string Decode(const std::vector<int32_t>& ids) const = 0;
  virtual int vocab_size() const = 0;
  virtual int bos_id() const = 0;
  virtual int eos_id() const = 0;
  // Recorded in shard attributes and indexes: "byte" or "sentencepiece:<sha256 of the .model>".
  virtual std::string name() const = 0;
};

// ids 0..255 are the bytes, 256 BOS, 257 EOS, 258 PAD; vocab 259 (the byte presets of
// model/config.cpp use bos_token_id 256, eos_token_id 257).
class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int kBos = 256;
  static constexpr int kEos = 257;
  static constexpr int kPad = 258;
  static constexpr int kVocab = 259;

  std::vector<int32_t> Encode(std::string_view text) const override;
  std::string Decode(const std::vector<int32_t>& ids) const override;
  int vocab_size() const override { return kVocab; }
  int bos_id() const override { return kBos; }
  int eos_id() const override { return kEos; }
  std::string name() const override { return "byte"; }
};

// spec: "byte", or the path of a SentencePiece .model file. Errors name the spec/file.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& spec);

// Trains a SentencePiece model (SentencePieceTrainer::Train with spm_train-style flags, e.g.
// "--input=corpus.txt --model_prefix=/tmp/m --vocab_size=8000 --model_type=bpe").
absl::Status TrainSentencePiece(const std::string& args);

}  // namespace dmc::data
