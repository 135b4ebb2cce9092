// Rotary position embedding, rotate-half layout as Hugging Face Llama uses it: for head dim D and
// half = D/2, channel i pairs with channel i + half, angle = pos · theta^(-2i/D):
//   out[i]        = x[i] cos - x[i+half] sin
//   out[i + half] = x[i+half] cos + x[i] sin
// x is [B, T, H, D]; token t of every sequence sits at position pos0 + t.
//
// DMC repurposes the last channel (D-1) of q and k as a control channel that RoPE must leave
// alone (model/DMC.md §1): with keep_last_channel the channel is treated as 0 while rotating and copied
// through unchanged, so out[half-1] = x[half-1] cos and out[D-1] = x[D-1].
#pragma once

namespace dmc::kernels {

template <typename T>
void rope_forward(T* out, const T* inp, int B, int T_, int H, int D, int pos0, float theta,
                  bool keep_last_channel);

// dinp = J^T dout (the inverse rotation, with the same control-channel exemption), or += with
// accumulate.
template <typename T>
void rope_backward(T* dinp, const T* dout, int B, int T_, int H, int D, int pos0, float theta,
                   bool keep_last_channel, bool accumulate);

}  // namespace dmc::kernels
