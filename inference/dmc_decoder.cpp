#include "inference/dmc_decoder.h"

#include <cmath>
#include <stdexcept>

#include "kernels/decode_attention.h"
#include "kernels/dmc_gates.h"
#include "kernels/embedding.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"

namespace dmc::inference {
namespace k = dmc::kernels;

template <typename T>
DmcDecoder<T>::DmcDecoder(const model::Llama<T>& model)
    : model_(model),
      cache_(model.config().num_hidden_layers, model.local_kv_heads(), model.config().head_dim(),
             model.config().dmc.window) {
  if (model.local_heads() != model.config().num_attention_heads)
    throw std::invalid_argument("DmcDecoder needs a tensor-parallel size 1 model");
  const model::LlamaConfig& c = model.config();
  const int C = c.hidden_size, D = c.head_dim(), H = c.num_attention_heads;
  const int Hkv = c.num_key_value_heads, F = c.intermediate_size;
  for (auto* v : {&x_, &xn_, &o_, &x2_}) v->assign(C, T(0));
  for (auto* v : {&q_, &qr_, &att_}) v->assign(size_t(H) * D, T(0));
  for (auto* v : {&k_, &v_}) v->assign(size_t(Hkv) * D, T(0));
  for (auto* v : {&gate_, &up_, &h_}) v->assign(F, T(0));
  for (auto* v : {&logit_, &alpha_, &merge_, &mask_, &omega_}) v->assign(Hkv, T(0));
  rstd_.assign(1, T(0));
  logits_.assign(c.vocab_size, T(0));
}

template <typename T>
const std::vector<T>& DmcDecoder<T>::Step(int32_t token) {
  const model::LlamaConfig& c = model_.config();
  const int C = c.hidden_size, D = c.head_dim(), H = c.num_attention_heads;
  const int Hkv = c.num_key_value_heads, V = c.vocab_size;
  const bool dmc = c.dmc.enabled;
  const int t = position_;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const k::DmcGateParams gate_params{c.dmc.init_val, c.dmc.temperature, c.dmc.omega_eps,
                                     k::DmcDecisionMode::kHard};

  k::embedding_forward(x_.data(), &token, model_.embedding(), 1, C);
  std::vector<const T*> keys(Hkv), values(Hkv);
  std::vector<int> lengths(Hkv);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const auto w = model_.layer(l);
    k::rmsnorm_forward(xn_.data(), rstd_.data(), x_.data(), w.attn_norm, 1, C, c.rms_norm_eps);
    k::matmul_forward(q_.data(), xn_.data(), w.wq, 1, C, H * D);
    k::matmul_forward(k_.data(), xn_.data(), w.wk, 1, C, Hkv * D);
    k::matmul_forward(v_.data(), xn_.data(), w.wv, 1, C, Hkv * D);
    if (dmc)  // hard decisions and importances of this token, from the control channels
      k::dmc_gates_forward<T>({logit_.data(), alpha_.data(), merge_.data(), mask_.data(),
                               omega_.data()},
                              q_.data(), k_.data(), nullptr, 1, 1, H, Hkv, D, gate_params);
    for (int h = 0; h < Hkv; ++h) {
      const bool merge = dmc && t > 0 && alpha_[h] > T(0.5);
      cache_.Add(l, h, k_.data() + size_t(h) * D, v_.data() + size_t(h) * D,
                 dmc ? omega_[h] : T(1), merge);
      // The open slot holds the pre-RoPE mean; rotate it at the newest token's position.
      T* key = cache_.open_key(l, h);
      std::vector<T> raw(key, key + D);
      k::rope_forward(key, raw.data(), 1, 1, 1, D, t, c.rope_theta, dmc);
      keys[h] = cache_.keys(l, h);
      values[h] = cache_.values(l, h);
      lengths[h] = cache_.length(l, h);
    }
    k::rope_forward(qr_.data(), q_.data(), 1, 1, H, D, t, c.rope_theta, dmc);
    k::decode_attention<T>(att_.data(), nullptr, qr_.data(), keys.data(), values.data(),
                           lengths.data(), H, Hkv, D, dmc, scale);
    k::matmul_forward(o_.data(), att_.data(), w.wo, 1, H * D, C);
    for (int i = 0; i < C; ++i) x2_[i] = x_[i] + o_[i];
    model_.MlpForward(l, x2_.data(), x_.data(), 1, rstd_.data(), xn_.data(), gate_.data(),
                      up_.data(), h_.data());
  }
  k::rmsnorm_forward(xn_.data(), rstd_.data(), x_.data(), model_.final_norm(), 1, C,
                     c.rms_norm_eps);
  k::matmul_forward(logits_.data(), xn_.data(), model_.lm_head(), 1, C, V);
  ++position_;
  return logits_;
}

template class DmcDecoder<float>;
template class DmcDecoder<double>;

}  // namespace dmc::inference
