// Stage 1 of DMC retrofitting (model/DMC.md §2) fades the control channel (index D-1) of q and k out of
// the model: it is multiplied by m = max(0, 1 - step / (0.8 · steps)) before and after RoPE, so the
// model learns to work without it. The op is linear, so its backward is the same scaling.
#pragma once

namespace dmc::kernels {

// x [rows, D]: x[r, D-1] *= m
template <typename T>
void scale_last_channel(T* x, long rows, int D, T m);

}  // namespace dmc::kernels
