// Rotary position embedding at explicit positions: the same rotation as kernels/rope.h (rotate-half
// layout, optional DMC control-channel exemption), but token t of every sequence sits at position
// positions[t] instead of pos0 + t. LoMA needs it: its memory and repetition zones reuse text
// positions (kernels/loma_mask.h), so positions are not a running count of the layout.
// x is [B, T, H, D]; positions [T] is shared by the B sequences.
#pragma once

#include <cstdint>

namespace dmc::kernels {

template <typename T>
void rope_forward_positions(T* out, const T* inp, int B, int T_, int H, int D,
                            const int32_t* positions, float theta, bool keep_last_channel);

// dinp = J^T dout, the inverse rotation at each token's position (+= with accumulate).
template <typename T>
void rope_backward_positions(T* dinp, const T* dout, int B, int T_, int H, int D,
                             const int32_t* positions, float theta, bool keep_last_channel,
                             bool accumulate);

}  // namespace dmc::kernels
