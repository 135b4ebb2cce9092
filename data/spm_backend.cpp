// Only this file includes the SentencePiece headers (see spm_backend.h). No Abseil here.
#include "data/spm_backend.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

namespace dmc::data::spm {

std::unique_ptr<Model> Model::Load(const std::string& path, std::string* error) {
  std::unique_ptr<Model> m(new Model);
  m->p_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  auto s = m->p_->Load(path);
  if (!s.ok()) {
    *error = s.ToString();
    return nullptr;
  }
  return m;
}

Model::~Model() = default;

bool Model::Encode(std::string_view text, std::vector<int32_t>* ids, std::string* error) const {
  std::vector<int> out;
  auto s = p_->Encode(text, &out);
  if (!s.ok()) {
    *error = s.ToString();
    return false;
  }
  ids->assign(out.begin(), out.end());
  return true;
}

std::string Model::Decode(const std::vector<int32_t>& ids) const {
  std::vector<int> in(ids.begin(), ids.end());
  std::string out;
  // Out-of-range ids make Decode fail; decode what is valid.
  std::vector<int> valid;
  valid.reserve(in.size());
  for (int id : in)
    if (id >= 0 && id < p_->GetPieceSize()) valid.push_back(id);
  if (!p_->Decode(valid, &out).ok()) return std::string();
  return out;
}

int Model::vocab_size() const { return p_->GetPieceSize(); }
int Model::bos_id() const { return p_->bos_id(); }
int Model::eos_id() const { return p_->eos_id(); }
int Model::pad_id() const { return p_->pad_id(); }

bool Train(const std::string& args, std::string* error) {
  auto s = sentencepiece::SentencePieceTrainer::Train(args);
  if (!s.ok()) {
    *error = s.ToString();
    return false;
  }
  return true;
}

}  // namespace dmc::data::spm
