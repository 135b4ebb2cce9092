// The decoders' last op: from a batch of logit rows, the next token, a log-probability and the
// argmax of each row, by one definition for the CPU decoder and the CUDA one, so that a seed gives
// the same text on either (to the rounding of the logits).
//
// For row i with logits l [V], temperature T_i, nucleus mass top_p_i and draw r_i in [0, 1):
//   argmax   = argmax_v l_v, ties to the lowest id
//   T_i = 0: next = argmax (greedy)
//   T_i > 0: p_v = exp((l_v − max l) / T_i)  (unnormalised)
//            tau = the largest p_u such that  sum_{v : p_v >= tau} p_v >= top_p_i · sum_v p_v
//            nucleus N = {v : p_v >= tau}: the smallest set of most likely tokens that reaches
//            top_p_i of the mass (tokens tied at tau all kept)
//            next = the lowest v in N with  sum_{u in N, u <= v} p_u > r_i · sum_{u in N} p_u
//            (inverse CDF in token-id order, which samples N's distribution as any fixed order
//            does, and needs no sort on the GPU)
//   logprob  = log_softmax(l)[target_i] at temperature 1 when target_i >= 0, else of next
// The draw r_i = SampleUniform(seed_i, position_i): counter-based, so a sequence's tokens do not
// depend on which other sequences share its batch or in which order.
//
// A step launched ahead (inference/decode_engine.h) is fed, in each row whose token is not known
// to the host yet (marked negative), the choice of the step before it, without a trip through
// the host:
//   tokens_i = previous_i  where tokens_i < 0,  i < n
#pragma once

#include <cstdint>

#include "kernels/host_device.h"

namespace dmc::kernels {

// splitmix64 of (seed, position), its top 24 bits as a float in [0, 1): exact in fp32, equal on
// host and device.
DMC_HOST_DEVICE inline float SampleUniform(uint64_t seed, int32_t position) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (static_cast<uint64_t>(position) + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
}

// Per-row settings of sample_tokens; arrays of n.
struct SampleRows {
  const float* temperature;  // 0: greedy
  const float* top_p;        // (0, 1]
  const uint64_t* seed;
  const int32_t* position;   // the draw's counter: the position the chosen token will take
  const int32_t* target;     // may be null (no targets); target < 0: logprob of next
};

// logits [n, V]; next, argmax [n]; logprob [n] (any output may be null).
template <typename T>
void sample_tokens(int32_t* next, float* logprob, int32_t* argmax, const T* logits, int n, int V,
                   const SampleRows& rows);

// tokens [n] in place from previous [n] (the step before's next), as above.
void take_previous_choices(int32_t* tokens, const int32_t* previous, int n);

}  // namespace dmc::kernels
