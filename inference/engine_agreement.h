// How closely one decoding engine follows another on the same model and text: the GPU engine
// against the CPU engine, its specification, on a user's own checkpoint (dmc-eval --device=cuda
// --against_cpu). Both engines decode the windows in lockstep, token by token and teacher-forced
// (token t fed, token t + 1 scored), max_batch windows at a time, and the figures compare what
// each step returned and what each cache holds.
//
// Decisions (DMC). After every step, a (layer, KV head) that holds one slot more has appended
// token t, one that holds as many has merged it (α_t = 1; token 0 always appends). A decision may
// differ where its logit a = k[D-1] - c lies within the candidate's rounding of the threshold 0:
// a GPU forms k[D-1] in bf16, whose unit is 2^-8 |k[D-1]| = 2^-8 |a + c|. Each flip's margin is
// |a| in that unit, a taken from the reference model's training forward with hard decisions,
// which equals its decoding (model/DMC.md §6). A flip changes the cache, and with it what every
// later step computes: a window's decisions are compared up to its first flip, and its
// log-probabilities are reported over all predictions and, apart, over those before that flip.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "inference/decode_engine.h"
#include "model/llama.h"

namespace dmc::inference {

struct EngineAgreement {
  long windows = 0, predictions = 0;
  // |log p_candidate − log p_reference| of each prediction's target
  double max_logprob_diff = 0, mean_logprob_diff = 0;
  double max_logprob_diff_before_flip = 0;  // over the predictions before each window's first flip
  long argmax_differ = 0;                   // predictions whose most likely token differs
  // DMC decisions ((token, layer, KV head)) compared, and those that differed, at the first
  // flipping step of each window that had one
  long decisions = 0, flips = 0, windows_flipped = 0;
  double max_flip_margin = 0;  // the largest |a| of a flip, in bf16 units of the decision channel
  // Summed over windows at their ends: tokens fed times KV heads and layers, slots held, and
  // bytes held (DecodeEngine::bytes, each engine at its own precision).
  long head_tokens = 0, reference_slots = 0, candidate_slots = 0;
  long reference_bytes = 0, candidate_bytes = 0;
};

// `model` is the reference engine's model (its forward gives the decision logits; its
// activations are overwritten); both engines run the same checkpoint and cache policy, with room
// for max_batch windows at once. windows: token windows (inputs and the last target), as
// dmc-eval loads them.
absl::StatusOr<EngineAgreement> CompareEngines(model::Llama<float>& model, DecodeEngine& reference,
                                               DecodeEngine& candidate,
                                               const std::vector<std::vector<int32_t>>& windows,
                                               int max_batch);

}  // namespace dmc::inference
