#include "kernels/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dmc::kernels {
namespace {

// Softmax of one query head over the scaled scores s[i] (overwritten) and its values vrow[i],
// in double: the reference the CUDA paged decode kernel is checked against.
template <typename T>
void AttendScores(T* og, T* probs, std::vector<double>& s, const std::vector<const T*>& vrow,
                  int D) {
  const int n = static_cast<int>(s.size());
  double max_s = -std::numeric_limits<double>::infinity();
  for (int i = 0; i < n; ++i) max_s = std::max(max_s, s[i]);
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += (s[i] = std::exp(s[i] - max_s));
  for (int c = 0; c < D; ++c) {
    double acc = 0;
    for (int i = 0; i < n; ++i) acc += s[i] * vrow[i][c];
    og[c] = static_cast<T>(acc / sum);
  }
  if (probs)
    for (int i = 0; i < n; ++i) probs[i] = static_cast<T>(s[i] / sum);
}

// Plain two-pass softmax attention of one query head over the rows krow[i], vrow[i]: the CPU
// decoder's inner loop.
template <typename T>
void AttendRows(T* og, T* probs, const T* qg, const std::vector<const T*>& krow,
                const std::vector<const T*>& vrow, int D, int dqk, float scale) {
  const int n = static_cast<int>(krow.size());
  std::vector<double> s(n, 0.0);
  for (int i = 0; i < n; ++i) {
    double dot = 0;
    for (int c = 0; c < dqk; ++c) dot += static_cast<double>(qg[c]) * krow[i][c];
    s[i] = dot * scale;
  }
  AttendScores(og, probs, s, vrow, D);
}

}  // namespace

template <typename T>
void paged_decode_attention(T* out, T* probs, int probs_stride, const T* q, const T* k_pool,
                            const T* v_pool, const int32_t* page_table, const int* lengths,
                            int max_pages, int page_size, int B, int H, int Hkv, int D,
                            bool exclude_ctrl, float scale) {
  const int group = H / Hkv;
  const int dqk = exclude_ctrl ? D - 1 : D;
  std::vector<const T*> krow, vrow;
  for (int b = 0; b < B; ++b)
    for (int g = 0; g < H; ++g) {
      const int head = b * Hkv + g / group;
      const int n = lengths[head];
      const int32_t* pages = page_table + static_cast<long>(head) * max_pages;
      krow.resize(n);
      vrow.resize(n);
      for (int i = 0; i < n; ++i) {
        const long row = static_cast<long>(pages[i / page_size]) * page_size + i % page_size;
        krow[i] = k_pool + row * D;
        vrow[i] = v_pool + row * D;
      }
      const long bg = static_cast<long>(b) * H + g;
      AttendRows(out + bg * D, probs ? probs + bg * probs_stride : nullptr, q + bg * D, krow,
                 vrow, D, dqk, scale);
    }
}

template <typename T>
void paged_decode_attention_quantized(T* out, T* probs, int probs_stride, const T* q,
                                      const uint8_t* pages, const KvQuantPageLayout& layout,
                                      const int32_t* page_table, const int* q_lengths,
                                      int max_pages, const T* r_k_pool, const T* r_v_pool,
                                      const int32_t* residual_block, const int* r_lengths,
                                      int residual_slots, int B, int H, int Hkv, int D,
                                      bool exclude_ctrl, float scale) {
  const int group = H / Hkv, P = layout.page_size;
  const int dqk = exclude_ctrl ? D - 1 : D;
  std::vector<T> keys, values;  // the dequantized rows of one KV head
  std::vector<const T*> krow, vrow;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hkv; ++h) {
      const int head = b * Hkv + h;
      const int nq = q_lengths[head], nr = r_lengths[head];
      keys.resize(static_cast<size_t>(nq) * D);
      values.resize(keys.size());
      krow.resize(nq + nr);
      vrow.resize(nq + nr);
      for (int i = 0; i < nq; ++i) {
        const uint8_t* page = pages + page_table[static_cast<long>(head) * max_pages + i / P] *
                                          layout.bytes;
        kv_dequantize_row(keys.data() + static_cast<long>(i) * D,
                          values.data() + static_cast<long>(i) * D, page, layout, i % P);
        krow[i] = keys.data() + static_cast<long>(i) * D;
        vrow[i] = values.data() + static_cast<long>(i) * D;
      }
      const long block = static_cast<long>(residual_block[head]) * residual_slots;
      for (int j = 0; j < nr; ++j) {
        krow[nq + j] = r_k_pool + (block + j) * D;
        vrow[nq + j] = r_v_pool + (block + j) * D;
      }
      for (int g = h * group; g < (h + 1) * group; ++g) {
        const long bg = static_cast<long>(b) * H + g;
        AttendRows(out + bg * D, probs ? probs + bg * probs_stride : nullptr, q + bg * D, krow,
                   vrow, D, dqk, scale);
      }
    }
}

template <typename T>
void paged_decode_attention_think(T* out, T* probs, int probs_stride, const T* q,
                                  const T* k_pages, const T* v_pages, const uint8_t* masks,
                                  int kept, const int32_t* page_table, const int* p_lengths,
                                  int max_pages, int page_size, const T* r_k_pool,
                                  const T* r_v_pool, const int32_t* residual_block,
                                  const int* r_lengths, int residual_slots, int B, int H, int Hkv,
                                  int D, bool exclude_ctrl, float scale) {
  const int group = H / Hkv, P = page_size, mask_bytes = ThinkMaskBytes(D);
  const int dqk = exclude_ctrl ? D - 1 : D;
  std::vector<const T*> vrow;
  std::vector<double> s;
  for (int b = 0; b < B; ++b)
    for (int g = 0; g < H; ++g) {
      const int head = b * Hkv + g / group;
      const int np = p_lengths[head], nr = r_lengths[head];
      const long bg = static_cast<long>(b) * H + g;
      const T* qg = q + bg * D;
      s.assign(np + nr, 0.0);
      vrow.resize(np + nr);
      for (int i = 0; i < np; ++i) {  // pruned rows: the kept channels only
        const long page = page_table[static_cast<long>(head) * max_pages + i / P];
        const uint8_t* mask = masks + page * mask_bytes;
        const T* k = k_pages + (page * P + i % P) * kept;
        double dot = 0;
        for (int c = 0, kc = 0; c < D; ++c) {
          if (!ThinkKept(mask, c)) continue;
          if (c < dqk) dot += static_cast<double>(qg[c]) * k[kc];
          ++kc;
        }
        s[i] = dot * scale;
        vrow[i] = v_pages + (page * P + i % P) * D;
      }
      const long block = static_cast<long>(residual_block[head]) * residual_slots;
      for (int j = 0; j < nr; ++j) {  // the residual: whole rows
        const T* k = r_k_pool + (block + j) * D;
        double dot = 0;
        for (int c = 0; c < dqk; ++c) dot += static_cast<double>(qg[c]) * k[c];
        s[np + j] = dot * scale;
        vrow[np + j] = r_v_pool + (block + j) * D;
      }
      AttendScores(out + bg * D, probs ? probs + bg * probs_stride : nullptr, s, vrow, D);
    }
}

template void paged_decode_attention<float>(float*, float*, int, const float*, const float*,
                                            const float*, const int32_t*, const int*, int, int,
                                            int, int, int, int, bool, float);
template void paged_decode_attention<double>(double*, double*, int, const double*, const double*,
                                             const double*, const int32_t*, const int*, int, int,
                                             int, int, int, int, bool, float);
template void paged_decode_attention_quantized<float>(
    float*, float*, int, const float*, const uint8_t*, const KvQuantPageLayout&, const int32_t*,
    const int*, int, const float*, const float*, const int32_t*, const int*, int, int, int, int,
    int, bool, float);
template void paged_decode_attention_quantized<double>(
    double*, double*, int, const double*, const uint8_t*, const KvQuantPageLayout&,
    const int32_t*, const int*, int, const double*, const double*, const int32_t*, const int*,
    int, int, int, int, int, bool, float);

template void paged_decode_attention_think<float>(float*, float*, int, const float*, const float*,
                                                  const float*, const uint8_t*, int,
                                                  const int32_t*, const int*, int, int,
                                                  const float*, const float*, const int32_t*,
                                                  const int*, int, int, int, int, int, bool,
                                                  float);
template void paged_decode_attention_think<double>(double*, double*, int, const double*,
                                                   const double*, const double*, const uint8_t*,
                                                   int, const int32_t*, const int*, int, int,
                                                   const double*, const double*, const int32_t*,
                                                   const int*, int, int, int, int, int, bool,
                                                   float);

}  // namespace dmc::kernels
