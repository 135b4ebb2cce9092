#include "kernels/kv_quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace dmc::kernels {
namespace {

// Bit offset of code c in a row: codes are packed little end first.
void PackRow(uint8_t* row, const uint8_t* codes, int n, int bits) {
  std::fill(row, row + KvCodeRowBytes(n, bits), uint8_t{0});
  for (int c = 0; c < n; ++c) {
    const long bit = static_cast<long>(c) * bits;
    row[bit / 8] |= static_cast<uint8_t>(codes[c] << (bit % 8));
  }
}

int UnpackCode(const uint8_t* row, int c, int bits) {
  const long bit = static_cast<long>(c) * bits;
  return (row[bit / 8] >> (bit % 8)) & ((1 << bits) - 1);
}

float* Floats(uint8_t* page, long offset) { return reinterpret_cast<float*>(page + offset); }
const float* Floats(const uint8_t* page, long offset) {
  return reinterpret_cast<const float*>(page + offset);
}

// One row x[D] per token, in groups of G channels: the codes packed into `packed`, the groups'
// scales and zero points into scale[D / G] and zero[D / G].
template <typename T>
void QuantizeRow(uint8_t* packed, float* scale, float* zero, const T* x, int D, int G, int bits) {
  std::vector<uint8_t> codes(D);
  for (int g = 0; g < D / G; ++g)
    kv_quantize_group(codes.data() + g * G, scale + g, zero + g, x + g * G, G, 1, bits);
  PackRow(packed, codes.data(), D, bits);
}

}  // namespace

KvQuantPageLayout kv_quant_page_layout(const KvQuantOptions& o, int page_size, int head_dim) {
  KvQuantPageLayout l;
  l.page_size = page_size;
  l.head_dim = head_dim;
  l.bits = o.bits;
  l.salient_bits = o.salient_slots > 0 ? o.salient_bits : 0;
  l.salient_slots = o.salient_slots > 0 ? o.salient_slots : 0;
  l.value_group = o.value_group > 0 ? o.value_group : head_dim;
  l.value_groups = head_dim / l.value_group;
  l.key_tiers = (l.salient_slots > 0 ? 1 : 0) + (l.salient_slots < page_size ? 1 : 0);
  l.token_keys = o.token_keys;
  l.key_group = !o.token_keys ? 1 : o.key_group > 0 ? o.key_group : head_dim;
  l.key_groups = head_dim / l.key_group;
  const long codes = KvRowOffset(l, page_size);
  l.key_codes = 0;
  l.value_codes = codes;
  l.key_params = (2 * codes + 3) / 4 * 4;  // the params are floats: 4-byte aligned
  l.value_params = l.key_params + 2L * KvKeyParamRows(l) * l.key_groups * sizeof(float);
  l.bytes = l.value_params + 2L * page_size * l.value_groups * sizeof(float);
  return l;
}

template <typename T>
void kv_quantize_group(uint8_t* codes, float* scale, float* zero, const T* x, int n, long stride,
                       int bits) {
  double lo = x[0], hi = x[0];
  for (int i = 1; i < n; ++i) {
    lo = std::min<double>(lo, x[i * stride]);
    hi = std::max<double>(hi, x[i * stride]);
  }
  // Stored as floats: the codes are chosen against the stored scale and zero point, so the
  // bound holds for what dequantization reads.
  KvGroupParams(lo, hi, bits, scale, zero);
  for (int i = 0; i < n; ++i) codes[i] = KvCode(x[i * stride], *scale, *zero, bits);
}

template <typename T>
void kv_quantize_row(uint8_t* page, const KvQuantPageLayout& l, int row, const T* key,
                     const T* value) {
  const int P = l.page_size, D = l.head_dim, bits = KvRowBits(l, row);
  float* key_scale = Floats(page, l.key_params) + static_cast<long>(row) * l.key_groups;
  QuantizeRow(page + l.key_codes + KvRowOffset(l, row), key_scale,
              key_scale + static_cast<long>(P) * l.key_groups, key, D, l.key_group, bits);
  float* value_scale = Floats(page, l.value_params) + static_cast<long>(row) * l.value_groups;
  QuantizeRow(page + l.value_codes + KvRowOffset(l, row), value_scale,
              value_scale + static_cast<long>(P) * l.value_groups, value, D, l.value_group, bits);
}

template <typename T>
void kv_quantize_page(uint8_t* page, const KvQuantPageLayout& l, const T* keys, const T* values) {
  const int P = l.page_size, D = l.head_dim;
  if (l.token_keys) {  // every row alone
    for (int r = 0; r < P; ++r)
      kv_quantize_row(page, l, r, keys + static_cast<long>(r) * D,
                      values + static_cast<long>(r) * D);
    return;
  }
  std::vector<uint8_t> codes(static_cast<size_t>(P) * D);
  float* key_scale = Floats(page, l.key_params);
  float* key_zero = key_scale + l.key_tiers * D;
  // Keys: each tier's rows, per channel.
  const int tier_start[2] = {0, l.salient_slots};
  const int tier_end[2] = {l.salient_slots, P};
  for (int tier = 0, index = 0; tier < 2; ++tier) {
    const int rows = tier_end[tier] - tier_start[tier];
    if (rows == 0) continue;
    const int bits = tier == 0 ? l.salient_bits : l.bits;
    std::vector<uint8_t> channel(rows);
    for (int c = 0; c < D; ++c) {
      kv_quantize_group(channel.data(), key_scale + index * D + c, key_zero + index * D + c,
                        keys + static_cast<long>(tier_start[tier]) * D + c, rows, D, bits);
      for (int r = 0; r < rows; ++r) codes[static_cast<size_t>(tier_start[tier] + r) * D + c] =
          channel[r];
    }
    ++index;
  }
  for (int r = 0; r < P; ++r)
    PackRow(page + l.key_codes + KvRowOffset(l, r), codes.data() + static_cast<size_t>(r) * D, D,
            KvRowBits(l, r));
  // Values: each row, per group of channels.
  float* value_scale = Floats(page, l.value_params);
  for (int r = 0; r < P; ++r)
    QuantizeRow(page + l.value_codes + KvRowOffset(l, r),
                value_scale + static_cast<long>(r) * l.value_groups,
                value_scale + static_cast<long>(P + r) * l.value_groups,
                values + static_cast<long>(r) * D, D, l.value_group, KvRowBits(l, r));
}

template <typename T>
void kv_dequantize_row(T* key, T* value, const uint8_t* page, const KvQuantPageLayout& l,
                       int row) {
  const int D = l.head_dim, bits = KvRowBits(l, row);
  const float* key_scale =
      Floats(page, l.key_params) + static_cast<long>(KvKeyParamRow(l, row)) * l.key_groups;
  const float* key_zero = key_scale + static_cast<long>(KvKeyParamRows(l)) * l.key_groups;
  const float* value_scale =
      Floats(page, l.value_params) + static_cast<long>(row) * l.value_groups;
  const float* value_zero = value_scale + static_cast<long>(l.page_size) * l.value_groups;
  const uint8_t* k = page + l.key_codes + KvRowOffset(l, row);
  const uint8_t* v = page + l.value_codes + KvRowOffset(l, row);
  for (int c = 0; c < D; ++c) {
    const int kg = c / l.key_group;
    key[c] = static_cast<T>(key_zero[kg] + UnpackCode(k, c, bits) * key_scale[kg]);
    const int g = c / l.value_group;
    value[c] = static_cast<T>(value_zero[g] + UnpackCode(v, c, bits) * value_scale[g]);
  }
}

template void kv_quantize_group<float>(uint8_t*, float*, float*, const float*, int, long, int);
template void kv_quantize_group<double>(uint8_t*, float*, float*, const double*, int, long, int);
template void kv_quantize_page<float>(uint8_t*, const KvQuantPageLayout&, const float*,
                                      const float*);
template void kv_quantize_page<double>(uint8_t*, const KvQuantPageLayout&, const double*,
                                       const double*);
template void kv_quantize_row<float>(uint8_t*, const KvQuantPageLayout&, int, const float*,
                                     const float*);
template void kv_quantize_row<double>(uint8_t*, const KvQuantPageLayout&, int, const double*,
                                      const double*);
template void kv_dequantize_row<float>(float*, float*, const uint8_t*, const KvQuantPageLayout&,
                                       int);
template void kv_dequantize_row<double>(double*, double*, const uint8_t*,
                                        const KvQuantPageLayout&, int);

}  // namespace dmc::kernels
