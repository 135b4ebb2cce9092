#include "data/tokenizer.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "data/sha256.h"
#include "data/spm_backend.h"

namespace dmc::data {

std::vector<int32_t> ByteTokenizer::Encode(std::string_view text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string out;
  out.reserve(ids.size());
  for (int32_t id : ids)
    if (id >= 0 && id < 256) out.push_back(static_cast<char>(id));
  return out;
}

namespace {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(std::unique_ptr<spm::Model> m, std::string name)
      : m_(std::move(m)), name_(std::move(name)) {}

  std::vector<int32_t> Encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    std::string err;
    // Encode only fails on an unloaded model, which Load() rules out.
    if (!m_->Encode(text, &ids, &err)) ids.clear();
    return ids;
  }
  std::string Decode(const std::vector<int32_t>& ids) const override { return m_->Decode(ids); }
  int vocab_size() const override { return m_->vocab_size(); }
  int bos_id() const override { return m_->bos_id(); }
  int eos_id() const override { return m_->eos_id(); }
  std::string name() const override { return name_; }

 private:
  std::unique_ptr<spm::Model> m_;
  std::string name_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& spec) {
  if (spec == "byte") return std::unique_ptr<Tokenizer>(new ByteTokenizer);
  if (spec.empty())
    return absl::InvalidArgumentError("tokenizer spec is empty (want \"byte\" or a .model path)");
  std::error_code ec;
  if (!std::filesystem::exists(spec, ec))
    return absl::NotFoundError(
        absl::StrCat(spec, ": tokenizer model not found (want \"byte\" or a SentencePiece .model path)"));
  std::ifstream in(spec, std::ios::binary);
  if (!in) return absl::UnavailableError(absl::StrCat(spec, ": cannot read tokenizer model"));
  std::stringstream ss;
  ss << in.rdbuf();
  std::string err;
  auto m = spm::Model::Load(spec, &err);
  if (m == nullptr)
    return absl::DataLossError(absl::StrCat(spec, ": not a valid SentencePiece model: ", err));
  if (m->vocab_size() <= 0)
    return absl::DataLossError(absl::StrCat(spec, ": SentencePiece model has an empty vocabulary"));
  std::string name = absl::StrCat("sentencepiece:", Sha256Hex(ss.str()));
  return std::unique_ptr<Tokenizer>(new SentencePieceTokenizer(std::move(m), std::move(name)));
}

absl::Status TrainSentencePiece(const std::string& args) {
  std::string err;
  if (!spm::Train(args, &err))
    return absl::InternalError(absl::StrCat("SentencePiece training failed: ", err));
  return absl::OkStatus();
}

}  // namespace dmc::data
