// LoMA (memory-token compression, Wang & Xiao, arXiv 2401.09486) as a second retrofitting method
// next to DMC: the training layout of a window, its targets and two-term loss, and the
// vocabulary extension by the two special tokens. The mask and the position ids live in
// kernels/loma_mask.h; model::Llama runs them when StepOptions::loma is enabled.
//
// Layout of one plain window of n·t·c tokens x (targets y, usually y[j] = x[j+1]), per chunk i:
//   position:  reading zone            memory zone      repetition zone
//   token      x[i·tc + r]             <m>              <r>
//   target     y[i·tc + r]             none (-1)        x[i·tc + r]       r = 0 .. tc-1
// so the reading zones carry the usual next-token loss (seeing only their own segment and the
// earlier memories) and the repetition zone must reproduce the segment from its memory alone.
//   loss = L_read + L_rep, each the mean cross-entropy over the labelled positions of its zones.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/loma_mask.h"
#include "model/llama.h"
#include "parallel/communicator.h"

namespace dmc::model {

// The zones and the two special tokens; a LoMA model's config carries its layout (config.loma).
using LomaLayout = LomaConfig;

// t ≥ 1 memory slots per chunk, compression ratio c ≥ 1; <m> and <r> are the ids base_vocab and
// base_vocab + 1, the two rows AddLomaTokens appends to a model of base_vocab tokens.
absl::StatusOr<LomaLayout> MakeLomaLayout(int base_vocab, int t, int c);

// A batch in the LoMA layout: B sequences of seq_len = n·t·(2c+1) positions.
struct LomaBatch {
  std::vector<int32_t> tokens, targets;
  int seq_len = 0;
};

// tokens, targets [B, plain_len] → the layout above; plain_len must be a positive multiple of
// t·c (a partial segment would have nothing to compress into).
absl::StatusOr<LomaBatch> LomaTransform(const LomaLayout& layout, const int32_t* tokens,
                                        const int32_t* targets, int B, int plain_len);

// Why a model of `config` cannot run a LoMA layout of seq_len positions (OK if it can): c ≥ 1,
// whole chunks, DMC off (the two methods do not combine), text positions within
// max_position_embeddings.
absl::Status CheckLomaStep(const kernels::LomaZones& z, int seq_len, const LlamaConfig& config);

// Position ids [seq_len] of the layout (kernels/loma_position), for RoPE.
std::vector<int32_t> LomaPositions(const kernels::LomaZones& z, int seq_len);

// The two loss terms from per-position cross-entropies [B, seq_len]: the mean over the labelled
// reading positions and over the labelled repetition positions (0 for a zone without labels).
// weights, when not null, receives d(reading + repetition)/d(losses[i]) per position.
struct LomaLosses {
  double reading = 0, repetition = 0;
};
template <typename T>
LomaLosses LomaZoneLosses(const T* losses, const int32_t* targets, int B, int seq_len,
                          const kernels::LomaZones& z, std::vector<double>* weights);

// A copy of `base` with the vocabulary grown by <m> and <r> (config().vocab_size + 2): every
// tensor copied, the new rows of the embedding (and of an untied LM head) set to the mean of the
// existing rows, so the special tokens start as an "average token" and a pre-trained model's
// logits over its own vocabulary are unchanged. tp must be the group `base` was built with (the
// call is collective over it: the vocabulary-parallel tables are gathered and re-split); the
// HF export then writes the grown vocab_size. With `zones` enabled (c >= 1) the grown config
// records the layout (config().loma = MakeLomaLayout(base vocab, t, c)), so checkpoints and the
// export say the model is a LoMA model.
template <typename T>
std::unique_ptr<Llama<T>> AddLomaTokens(const Llama<T>& base, parallel::Communicator* tp,
                                        const kernels::LomaZones& zones = {});

}  // namespace dmc::model
