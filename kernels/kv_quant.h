// Quantization of KV cache pages to b-bit integers (b = 2, 4 or 8), with the granularities of
// KIVI (Liu et al., ICML 2024) and ZipCache (He et al., NeurIPS 2024, arXiv 2405.14256): keys
// per channel, values per token; or keys per token too (token_keys), so that every row of a page
// is independent of the others.
//
// One group x_1..x_n of reals is quantized asymmetrically (min-max, round to nearest):
//   lo = min x, hi = max x, scale = (hi − lo) / (2^b − 1)   (scale = 1 when hi = lo)
//   q_j = clamp(round((x_j − lo) / scale), 0, 2^b − 1),  x̂_j = lo + q_j · scale
// so |x̂_j − x_j| <= scale / 2 (up to float round-off).
// Groups of a page of P slots (rows) of head dimension D:
//   keys    per channel: for each channel c, the group is the keys' channel c over the rows of
//           one tier (below): keys have outlier channels, and a channel varies little over tokens
//           (KIVI §3, ZipCache Fig. 2), so each channel gets its own scale and zero point;
//           per token (token_keys): for each row, groups of `key_group` consecutive channels (D
//           when 0), as the values. An outlier channel widens its group's scale, which costs
//           little at 8 bits and more at 4 or 2 (KIVI's reason for the per-channel rule); what it
//           buys is that a row is written alone, so a cache quantizes each slot as it settles
//           instead of keeping a page of settled slots at full precision until the page fills;
//   values  per token: for each row, groups of `value_group` consecutive channels (D when 0).
// Mixed precision (ZipCache §4.2): the first S = salient_slots rows of a page (its salient tokens,
// chosen by the cache) are stored at salient_bits, the other P − S at bits; each tier has its own
// per-channel key scales (ZipCache quantizes salient and other tokens separately).
//
// Page layout in bytes (every page of a cache has the same size, so pages come from one pool):
//   key codes     S rows of D·salient_bits/8 bytes, then P − S rows of D·bits/8 bytes; each row
//                 packs its codes little end first (channel c of an 4-bit row: byte c/2, low
//                 nibble for even c)
//   value codes   the same
//   key params    float scale[R][key_groups], then float zero[R][key_groups]: per channel R =
//                 tiers (the salient and the other rows, each only when it has rows) and
//                 key_groups = D; per token R = P and key_groups = D/key_group
//   value params  float scale[P][D/value_group], then float zero[P][D/value_group]
// Scales and zero points are fp32 (the papers keep them in fp16), in both key layouts: a row's
// per-token parameters then cost 8 bytes a group, which at D 64 and one group per head is an
// eighth of an int8 row's codes.
// The CUDA versions (kernels/cuda_ops.h: kv_quantize_pages, kv_quantize_rows for per-token keys,
// paged_decode_attention_quantized) read and write the same bytes through the layout helpers
// below (the GPU engine keeps keys per token on the vanilla and dmc caches, not on dms:
// ValidateGpuKvQuant, inference/cache_policy.h).
#pragma once

#include <math.h>

#include <cstdint>

#include "kernels/host_device.h"

namespace dmc::kernels {

struct KvQuantOptions {
  int bits = 0;           // 8, 4 or 2; 0: the cache is not quantized
  int value_group = 0;    // channels per value group; 0: the whole head
  int salient_bits = 0;   // ZipCache: bits of the salient rows (0: none)
  int salient_slots = 0;  // ZipCache: salient rows of every page
  bool token_keys = false;  // keys per token (groups of key_group channels), not per channel
  int key_group = 0;        // token_keys: channels per key group; 0: the whole head
};

struct KvQuantPageLayout {
  int page_size = 0, head_dim = 0, bits = 0, salient_bits = 0, salient_slots = 0;
  int value_groups = 0, value_group = 0, key_tiers = 0;
  // Key params of row r, channel c: entry KvKeyParamRow(r)·key_groups + c / key_group of the
  // scales (and of the zeros). Per channel: key_group 1, key_groups D; per token: the groups.
  bool token_keys = false;
  int key_group = 0, key_groups = 0;
  long key_codes = 0, value_codes = 0, key_params = 0, value_params = 0;  // byte offsets
  long bytes = 0;                                                         // of one page
};

// Bytes of one packed row of n codes of `bits` bits.
DMC_HOST_DEVICE inline long KvCodeRowBytes(int n, int bits) {
  return (static_cast<long>(n) * bits + 7) / 8;
}

// Rows [0, S) of a page are the salient tier, [S, P) the other one: the bits of row `row`, the
// byte offset of its codes within the key (or value) codes, and the index of its key tier among
// the tiers present.
DMC_HOST_DEVICE inline int KvRowBits(const KvQuantPageLayout& l, int row) {
  return row < l.salient_slots ? l.salient_bits : l.bits;
}
DMC_HOST_DEVICE inline long KvRowOffset(const KvQuantPageLayout& l, int row) {
  const int salient = row < l.salient_slots ? row : l.salient_slots;
  return salient * KvCodeRowBytes(l.head_dim, l.salient_bits) +
         (row - salient) * KvCodeRowBytes(l.head_dim, l.bits);
}
DMC_HOST_DEVICE inline int KvKeyTier(const KvQuantPageLayout& l, int row) {
  return row < l.salient_slots || l.salient_slots == 0 ? 0 : 1;
}
// The rows of key params (R above) and the one row `row` reads.
DMC_HOST_DEVICE inline int KvKeyParamRows(const KvQuantPageLayout& l) {
  return l.token_keys ? l.page_size : l.key_tiers;
}
DMC_HOST_DEVICE inline int KvKeyParamRow(const KvQuantPageLayout& l, int row) {
  return l.token_keys ? row : KvKeyTier(l, row);
}

// The rule of one group (above) in the precision both versions compute it in: the group's min lo
// and max hi give the stored zero point and scale, and x its code against them (round half to
// even, in double).
DMC_HOST_DEVICE inline void KvGroupParams(double lo, double hi, int bits, float* scale,
                                          float* zero) {
  *zero = static_cast<float>(lo);
  *scale = hi > lo ? static_cast<float>((hi - lo) / ((1 << bits) - 1)) : 1.0f;
}
DMC_HOST_DEVICE inline uint8_t KvCode(double x, float scale, float zero, int bits) {
  const double q = nearbyint((x - zero) / scale), top = (1 << bits) - 1;
  return static_cast<uint8_t>(q < 0.0 ? 0.0 : q > top ? top : q);
}

// The layout of a page of page_size rows; options must be valid (inference/cache_policy.h checks).
KvQuantPageLayout kv_quant_page_layout(const KvQuantOptions& options, int page_size, int head_dim);

// Quantizes n values x[i · stride] as one group: codes[i] (unpacked, one per byte), *scale, *zero.
template <typename T>
void kv_quantize_group(uint8_t* codes, float* scale, float* zero, const T* x, int n, long stride,
                       int bits);

// Writes a page from keys and values [P, D] (rows [0, S) the salient tier).
template <typename T>
void kv_quantize_page(uint8_t* page, const KvQuantPageLayout& layout, const T* keys,
                      const T* values);

// Per-token keys (layout.token_keys): writes row `row` of a page from key[D] and value[D],
// leaving its other rows as they are.
template <typename T>
void kv_quantize_row(uint8_t* page, const KvQuantPageLayout& layout, int row, const T* key,
                     const T* value);

// Dequantizes row `row` of a page into key[D] and value[D].
template <typename T>
void kv_dequantize_row(T* key, T* value, const uint8_t* page, const KvQuantPageLayout& layout,
                       int row);

}  // namespace dmc::kernels
