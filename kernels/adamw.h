// AdamW with decoupled weight decay (Loshchilov & Hutter), on fp32 master weights:
//   g = grad · grad_scale            (grad_scale folds in gradient clipping)
//   m = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2
//   param -= lr · ( (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps) + weight_decay · param )
#pragma once
#include <cstddef>

namespace dmc::kernels {

struct AdamWHyper {
  float lr = 3e-4f;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  int step = 1;  // 1-based, for the bias corrections
};

void adamw_update(float* param, const float* grad, float* m, float* v, size_t n,
                  const AdamWHyper& hyper, float grad_scale);

}  // namespace dmc::kernels
