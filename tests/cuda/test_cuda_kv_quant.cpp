// GPU vs CPU reference: the quantized KV cache (kernels/kv_quant.h) and the decode attention over
// it (kernels/decode_attention.h, paged_decode_attention_quantized). Fresh random inputs on every
// run; int8, int4, int2 and three ZipCache mixtures (a quarter of the rows at 8 bits, the rest 4;
// one row at 4, the rest 2; every row salient), value groups of the whole head down to 4
// channels (two groups inside one thread's 8 channels), head dims 64 and 128, page sizes 12, 16,
// 32 and 48.
//   Quantization: the pages kv_quantize_pages writes from rows gathered in shuffled order are
//   compared byte for byte with kernels::kv_quantize_page on the same rows. Every source row no
//   page takes is 1e30 (a read of one moves a group's min or max, and so its bytes), and every
//   pool page no page id names stays as poisoned, as in the CPU's pool.
//   Per-token keys: the rows kv_quantize_rows writes into partly filled pages, a prefill's at
//   once and then a row of every page a launch, against kernels::kv_quantize_row's byte for byte
//   (int8, int4, int2; key and value groups of the whole head down to 4 channels), rows never
//   written staying poisoned.
//   Attention: pages written by the CPU quantizer, GQA groups 1, 4, 8 and 16, heads of random
//   lengths in pages and in their residual blocks (always among them: full table and full
//   residual, no page and one residual slot, one page and no residual, no page and a full
//   residual), split chunks of the kernel's choice, 37 slots (off every page, tile and residual
//   boundary), 24 (a 16-slot tile straddles every other chunk boundary) or one per head, with
//   and without probs and the control channel. Groups of 4 to 16 at page sizes 16, 32 and 48
//   take the tensor-core path (one to three 16-slot tiles a page, the ZipCache tiers split
//   inside a tile or between tiles), the others and page size 12 the CUDA-core path. Every spare
//   page is 0xFF bytes (NaN scales, so NaN rows), every unused page-table entry names one, and
//   every residual row no head holds is NaN, so a wrong read fails the comparison; outputs and
//   probs are NaN-poisoned, so an unwritten element fails; a second identical call is
//   bit-identical. Keys per token (key groups of the whole head down to 4 channels) on both
//   paths, each head's last page partly filled (its other rows 0xFF bytes): the tensor-core
//   path's tile where that page ends is part page, part residual.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/decode_attention.h"
#include "kernels/kv_quant.h"
#include "tests/cuda/cuda_test_util.h"

namespace dmc::cuda_test {
namespace {
namespace K = dmc::kernels;
namespace C = dmc::cuda;

class CudaKvQuant : public ::testing::Test {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

struct Mode {
  const char* name;
  int bits, salient_bits;
  int salient_slots;  // -1: every row of the page; -4: a quarter of them
  bool token_keys;
  int key_group;  // token_keys: 0, the whole head
};
const Mode kModes[] = {{"int8", 8, 0, 0, false, 0},     {"int4", 4, 0, 0, false, 0},
                       {"int2", 2, 0, 0, false, 0},     {"zip8/4 P/4", 4, 8, -4, false, 0},
                       {"zip4/2 1", 2, 4, 1, false, 0}, {"zip8/2 all", 2, 8, -1, false, 0}};
// Keys per token: whole-head key groups, 32 channels, 8 (one thread's channels) and 4 (two
// groups inside one thread's channels).
const Mode kTokenModes[] = {{"int8 token", 8, 0, 0, true, 0},
                            {"int4 token kg32", 4, 0, 0, true, 32},
                            {"int2 token kg8", 2, 0, 0, true, 8},
                            {"int4 token kg4", 4, 0, 0, true, 4}};

K::KvQuantOptions options_of(const Mode& m, int page_size, int value_group) {
  const int salient = m.salient_slots == -1   ? page_size
                      : m.salient_slots == -4 ? page_size / 4
                                              : m.salient_slots;
  return K::KvQuantOptions{m.bits, value_group, m.salient_bits, salient, m.token_keys,
                           m.key_group};
}

std::string name_of(const Mode& m, int D, int P, int value_group) {
  return std::string(m.name) + " D" + std::to_string(D) + " ps" + std::to_string(P) + " vg" +
         std::to_string(value_group);
}

// Rows as keys and values look: unit normals, an outlier channel (KIVI Fig. 2), a channel
// offset, and channel 2 constant over the whole set (a group with max = min: scale 1).
std::vector<double> random_rows(int rows, int D) {
  std::normal_distribution<double> n(0.0, 1.0);
  std::vector<double> x(static_cast<size_t>(rows) * D);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < D; ++c)
      x[static_cast<size_t>(r) * D + c] =
          c == 2 ? 0.75 : n(rng()) * (c == 1 ? 4.0 : 1.0) + 0.01 * c;
  return x;
}

// The pool the GPU wrote, byte for byte against the CPU's; the first difference by page region.
void expect_same_bytes(const std::string& what, const std::vector<uint8_t>& got,
                       const std::vector<uint8_t>& want, const K::KvQuantPageLayout& layout) {
  long differ = 0, first = -1;
  for (size_t i = 0; i < want.size(); ++i)
    if (got[i] != want[i]) {
      if (first < 0) first = static_cast<long>(i);
      ++differ;
    }
  if (first >= 0) {
    const long offset = first % layout.bytes;
    const char* region = offset < layout.value_codes    ? "key codes"
                         : offset < layout.key_params   ? "value codes"
                         : offset < layout.value_params ? "key scales/zeros"
                                                        : "value scales/zeros";
    ADD_FAILURE() << what << ": " << differ << " of " << want.size()
                  << " bytes differ from the CPU's; the first at byte " << offset << " ("
                  << region << ") of pool page " << first / layout.bytes << ": "
                  << int(got[first]) << " vs " << int(want[first]);
  }
  std::printf("[ bytes ] quantize %-34s %ld of %zu bytes differ\n", what.c_str(), differ,
              want.size());
}

// ---- quantize-on-write: kv_quantize_pages against kv_quantize_page, byte for byte ----

void run_quantize(const Mode& m, int D, int P, int value_group) {
  const K::KvQuantPageLayout layout =
      K::kv_quant_page_layout(options_of(m, P, value_group), P, D);
  const std::string what = name_of(m, D, P, value_group);
  const int n = 7, spare_pages = 4, spare_rows = 2 * P + 3;
  const int src_rows = n * P + spare_rows;

  // Sources: the rows the pages take, then rows no page takes (1e30), shuffled together.
  std::vector<double> kd = random_rows(src_rows, D), vd = random_rows(src_rows, D);
  const std::vector<int32_t> order = shuffled_ids(src_rows);
  for (int i = n * P; i < src_rows; ++i)
    for (int c = 0; c < D; ++c) {
      kd[static_cast<size_t>(order[i]) * D + c] = 1e30;
      vd[static_cast<size_t>(order[i]) * D + c] = -1e30;
    }
  const std::vector<int32_t> rows(order.begin(), order.begin() + n * P);
  auto kb = to_bf16(kd), vb = to_bf16(vd);

  const std::vector<int32_t> pool_pages = shuffled_ids(n + spare_pages);
  const std::vector<int32_t> page_ids(pool_pages.begin(), pool_pages.begin() + n);
  const size_t pool_bytes = static_cast<size_t>(n + spare_pages) * layout.bytes;

  std::vector<uint8_t> want(pool_bytes, 0xFF);
  std::vector<double> keys(static_cast<size_t>(P) * D), values(keys.size());
  for (int j = 0; j < n; ++j) {
    for (int r = 0; r < P; ++r)
      for (int c = 0; c < D; ++c) {
        keys[static_cast<size_t>(r) * D + c] = kd[static_cast<size_t>(rows[j * P + r]) * D + c];
        values[static_cast<size_t>(r) * D + c] = vd[static_cast<size_t>(rows[j * P + r]) * D + c];
      }
    K::kv_quantize_page(want.data() + static_cast<size_t>(page_ids[j]) * layout.bytes, layout,
                        keys.data(), values.data());
  }

  DevBuf<uint8_t> dpages(pool_bytes), dpages2(pool_bytes);
  DevBuf<bf16> dk(kb), dv(vb);
  DevBuf<int32_t> drows(rows), dids(page_ids);
  dpages.poison();
  dpages2.poison();
  C::kv_quantize_pages(dpages, layout, dids, dk, dv, drows, n);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  const std::vector<uint8_t> got = dpages.download();
  expect_same_bytes(what, got, want, layout);

  C::kv_quantize_pages(dpages2, layout, dids, dk, dv, drows, n);
  const std::vector<uint8_t> got2 = dpages2.download();
  EXPECT_EQ(std::memcmp(got.data(), got2.data(), pool_bytes), 0) << what << ": two runs differ";
}

TEST_F(CudaKvQuant, QuantizePagesBitExact) {
  for (const Mode& m : kModes)
    for (int D : {64, 128})
      for (int P : {16, 12})
        for (int value_group : {0, 32, 4}) run_quantize(m, D, P, value_group);
}

// ---- per-token keys: kv_quantize_rows against kv_quantize_row, byte for byte ----

// n pages in a pool with spare ones, each filled to its own number of rows (the first page
// whole, the second one row, the others at random; the rows past it stay poisoned in both
// pools, as a head's last page is until its slots settle): the first half of every page's rows
// in one launch, in shuffled order (a prefill), then one row of every page a launch (decode
// steps), the pages already full given a negative page id. Every source row no entry takes is
// ±1e30, and the negative entries take those rows.
void run_quantize_rows(int bits, int D, int P, int key_group, int value_group) {
  const K::KvQuantPageLayout layout =
      K::kv_quant_page_layout(K::KvQuantOptions{bits, value_group, 0, 0, true, key_group}, P, D);
  const std::string what = "int" + std::to_string(bits) + " token kg" +
                           std::to_string(key_group) + " vg" + std::to_string(value_group) +
                           " D" + std::to_string(D) + " ps" + std::to_string(P);
  const int n = 6, spare_pages = 3, spare_rows = P + 3;
  std::vector<int> filled(n), first_source(n);
  std::uniform_int_distribution<int> any_fill(1, P);
  int total = 0;
  for (int j = 0; j < n; ++j) {
    filled[j] = j == 0 ? P : j == 1 ? 1 : any_fill(rng());
    first_source[j] = total;
    total += filled[j];
  }
  const int src_rows = total + spare_rows;
  std::vector<double> kd = random_rows(src_rows, D), vd = random_rows(src_rows, D);
  const std::vector<int32_t> order = shuffled_ids(src_rows);
  for (int i = total; i < src_rows; ++i)
    for (int c = 0; c < D; ++c) {
      kd[static_cast<size_t>(order[i]) * D + c] = 1e30;
      vd[static_cast<size_t>(order[i]) * D + c] = -1e30;
    }
  auto kb = to_bf16(kd), vb = to_bf16(vd);

  const std::vector<int32_t> pool_pages = shuffled_ids(n + spare_pages);
  const size_t pool_bytes = static_cast<size_t>(n + spare_pages) * layout.bytes;
  std::vector<uint8_t> want(pool_bytes, 0xFF);
  for (int j = 0; j < n; ++j)
    for (int r = 0; r < filled[j]; ++r) {
      const size_t src = order[first_source[j] + r];
      K::kv_quantize_row(want.data() + static_cast<size_t>(pool_pages[j]) * layout.bytes, layout,
                         r, kd.data() + src * D, vd.data() + src * D);
    }

  DevBuf<uint8_t> dpages(pool_bytes);
  DevBuf<bf16> dk(kb), dv(vb);
  dpages.poison();
  struct Entry {
    int32_t page, row, source;
  };
  auto launch = [&](const std::vector<Entry>& entries) {
    std::vector<int32_t> ids, page_rows, sources;
    for (const Entry& e : entries) {
      ids.push_back(e.page);
      page_rows.push_back(e.row);
      sources.push_back(e.source);
    }
    DevBuf<int32_t> dids(ids), dpage_rows(page_rows), dsources(sources);
    C::kv_quantize_rows(dpages, layout, dids, dpage_rows, dk, dv, dsources,
                        static_cast<int>(entries.size()));
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  };
  auto entry = [&](int j, int r) {
    return r < filled[j] ? Entry{pool_pages[j], r, order[first_source[j] + r]}
                         : Entry{-1, r, order[total + j % spare_rows]};
  };
  std::vector<Entry> prefill;
  for (int j = 0; j < n; ++j)
    for (int r = 0; r < filled[j] / 2; ++r) prefill.push_back(entry(j, r));
  prefill.push_back(Entry{-1, 0, order[total]});
  std::shuffle(prefill.begin(), prefill.end(), rng());
  launch(prefill);
  for (int r = 0; r < P; ++r) {
    std::vector<Entry> step;
    for (int j = 0; j < n; ++j)
      if (r >= filled[j] / 2) step.push_back(entry(j, r));
    launch(step);
  }
  expect_same_bytes(what, dpages.download(), want, layout);
}

// Each quantizer writes one key layout: a page at a time keys per channel, a row at a time keys
// per token. Given the other, it stops by name before any launch (no GPU needed).
TEST(CudaKvQuantLayouts, QuantizersRefuseTheOtherKeyLayoutByName) {
  const int P = 16, D = 64;
  const K::KvQuantPageLayout per_channel =
      K::kv_quant_page_layout(K::KvQuantOptions{8, D, 0, 0, false, 0}, P, D);
  const K::KvQuantPageLayout per_token =
      K::kv_quant_page_layout(K::KvQuantOptions{8, D, 0, 0, true, 0}, P, D);
  auto* pages = reinterpret_cast<uint8_t*>(uintptr_t{0x10000});
  const auto* kv = reinterpret_cast<const bf16*>(uintptr_t{0x20000});
  const auto* ids = reinterpret_cast<const int32_t*>(uintptr_t{0x30000});
  EXPECT_DEATH(C::kv_quantize_pages(pages, per_token, ids, kv, kv, ids, 1),
               "kv_quantize_pages: keys per token are written a row at a time: kv_quantize_rows");
  EXPECT_DEATH(C::kv_quantize_rows(pages, per_channel, ids, ids, kv, kv, ids, 1),
               "kv_quantize_rows: keys per channel are written a page at a time");
}

TEST_F(CudaKvQuant, QuantizeRowsBitExact) {
  const int groups[4][2] = {{0, 0}, {32, 4}, {4, 32}, {8, 0}};  // key group, value group
  for (int bits : {8, 4, 2})
    for (int D : {64, 128})
      for (int P : {16, 12})
        for (const auto& g : groups) run_quantize_rows(bits, D, P, g[0], g[1]);
}

// ---- the decode attention over a quantized cache ----

struct Case {
  Mode mode;
  int B, Hkv, G, D, page_size, value_group;
  int max_pages, settle_lag;  // residual blocks of page_size + settle_lag slots, as the cache's
  int split_slots;            // 0: the kernel chooses
  bool probs, exclude_ctrl;
};

std::string name_of(const Case& c, const char* what) {
  return std::string("qdecode ") + what + " " +
         name_of(c.mode, c.D, c.page_size, c.value_group) + " B" + std::to_string(c.B) +
         " Hkv" + std::to_string(c.Hkv) + " G" + std::to_string(c.G) + " pages<=" +
         std::to_string(c.max_pages) +
         (c.split_slots ? " split" + std::to_string(c.split_slots) : std::string(" split auto")) +
         (c.probs ? " probs" : "") + (c.exclude_ctrl ? " ctrl" : "");
}

void run_case(const Case& c) {
  const int H = c.Hkv * c.G, D = c.D, P = c.page_size, heads = c.B * c.Hkv;
  const int residual = P + c.settle_lag;
  const K::KvQuantPageLayout layout =
      K::kv_quant_page_layout(options_of(c.mode, P, c.value_group), P, D);

  // Lengths in pages and residual slots, at least one slot per head; the four edge heads first.
  // Keys per token: a head's last page holds 1 to P rows (the first edge head's P, the third's
  // one).
  std::vector<int> pages_of, r_len;
  random_settled_lengths(heads, c.max_pages, residual, &pages_of, &r_len);
  std::vector<int> q_len(heads);
  std::uniform_int_distribution<int> any_unfilled(0, P - 1);
  for (int h = 0; h < heads; ++h) {
    const int unfilled = !c.mode.token_keys || pages_of[h] == 0 ? 0
                         : h == 0                               ? 0
                         : h == 2                               ? P - 1
                                                                : any_unfilled(rng());
    q_len[h] = pages_of[h] * P - unfilled;
  }

  // Pages: the used ones in shuffled order among spare ones (0xFF bytes); every unused
  // page-table entry names a spare page. A last page's rows past the head's quantized slots stay
  // 0xFF bytes too.
  const int spare = 3;
  const int npages = std::accumulate(pages_of.begin(), pages_of.end(), 0) + spare;
  std::vector<uint8_t> pool(static_cast<size_t>(npages) * layout.bytes, 0xFF);
  std::vector<int32_t> table;
  shuffled_page_tables(pages_of, c.max_pages, spare, &table, [](int32_t) {});
  for (int h = 0; h < heads; ++h)
    for (int pg = 0; pg < pages_of[h]; ++pg) {
      uint8_t* page =
          pool.data() + static_cast<size_t>(table[h * c.max_pages + pg]) * layout.bytes;
      const std::vector<double> keys = random_rows(P, D), values = random_rows(P, D);
      const int rows = std::min(P, q_len[h] - pg * P);
      if (rows == P)
        K::kv_quantize_page(page, layout, keys.data(), values.data());
      else
        for (int r = 0; r < rows; ++r)
          K::kv_quantize_row(page, layout, r, keys.data() + r * D, values.data() + r * D);
    }

  // Residual blocks: one per head, shuffled among spare ones; rows no head holds are NaN.
  const int nblocks = heads + 2;
  const std::vector<int32_t> block_perm = shuffled_ids(nblocks);
  const std::vector<int32_t> blocks(block_perm.begin(), block_perm.begin() + heads);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> rkd(static_cast<size_t>(nblocks) * residual * D, nan), rvd(rkd.size(), nan);
  for (int h = 0; h < heads; ++h) {
    const std::vector<double> keys = random_rows(r_len[h], D), values = random_rows(r_len[h], D);
    const size_t base = static_cast<size_t>(blocks[h]) * residual * D;
    std::copy(keys.begin(), keys.end(), rkd.begin() + base);
    std::copy(values.begin(), values.end(), rvd.begin() + base);
  }

  auto qd = randn(static_cast<size_t>(c.B) * H * D);
  if (c.exclude_ctrl)  // a large control channel: counting it in q·k would change everything
    for (int bh = 0; bh < c.B * H; ++bh) qd[static_cast<size_t>(bh) * D + D - 1] = 40.0;
  auto qb = to_bf16(qd), rkb = to_bf16(rkd), rvb = to_bf16(rvd);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const int stride = c.max_pages * P + residual + 3;
  const size_t out_n = static_cast<size_t>(c.B) * H * D;
  const size_t probs_n = c.probs ? static_cast<size_t>(c.B) * H * stride : 1;

  DevBuf<bf16> dq(qb), drk(rkb), drv(rvb), dout(out_n);
  DevBuf<uint8_t> dpool(pool);
  DevBuf<int32_t> dtable(table), dblocks(blocks);
  DevBuf<int> dqlen(q_len), drlen(r_len);
  DevBuf<float> dprobs(probs_n);
  auto launch = [&](bf16* out, float* probs) {
    C::paged_decode_attention_quantized(out, c.probs ? probs : nullptr, stride, dq, dpool, layout,
                                        dtable, dqlen, c.max_pages, drk, drv, dblocks, drlen,
                                        residual, c.B, H, c.Hkv, D, c.exclude_ctrl, scale,
                                        nullptr, c.split_slots);
  };
  dout.poison();
  dprobs.poison();
  launch(dout, dprobs);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  const auto out = dout.download();
  const auto probs = dprobs.download();

  std::vector<double> ref(out_n);
  std::vector<double> ref_probs(c.probs ? probs_n : 0, 0.0);
  K::paged_decode_attention_quantized<double>(
      ref.data(), c.probs ? ref_probs.data() : nullptr, stride, qd.data(), pool.data(), layout,
      table.data(), q_len.data(), c.max_pages, rkd.data(), rvd.data(), blocks.data(), r_len.data(),
      residual, c.B, H, c.Hkv, D, c.exclude_ctrl, scale);
  expect_close(name_of(c, "out").c_str(), out, ref, kBf16Tol);

  // The tensor-core path (decode_attention_quantized.cu) takes groups of 4 to 16 when a page
  // holds whole 16-slot tiles; it rounds the dequantized keys to bf16 (relative error <= 2^-9 per
  // element), which moves a score by about 1e-3 at these shapes (scale · |q| |k| 2^-9 / sqrt 3)
  // and the weights relatively as much; the CUDA-core path keeps them fp32, as the reference.
  const bool tensor_cores = c.G >= 4 && c.G <= 16 && P % 16 == 0;
  const double probs_tol = tensor_cores ? 5e-3 : 1e-4;

  if (c.probs) {
    std::vector<int> slots(heads);
    for (int h = 0; h < heads; ++h) slots[h] = q_len[h] + r_len[h];
    expect_probs(name_of(c, "probs"), probs, ref_probs, slots, c.B, H, c.G, stride, probs_tol);
  }

  expect_rerun_identical(name_of(c, "out"), launch, out, probs);
}

// Every mode of `modes` x D 64, 128 x GQA 1, 4, 8, 16 x the page sizes; the split, the value
// group, probs and the control channel cycle over the cases, so that every mode meets each of
// them.
template <size_t N>
void run_modes_and_shapes(const Mode (&modes)[N], std::initializer_list<int> page_sizes) {
  const int value_groups[4] = {0, 32, 4, 8};
  int index = 0;
  for (const Mode& m : modes)
    for (int D : {64, 128})
      for (int G : {1, 4, 8, 16})
        for (int P : page_sizes) {
          const int split = index % 3 == 0 ? 0 : index % 3 == 1 ? 37 : 1 << 20;
          run_case(Case{m, 3, 2, G, D, P, value_groups[index % 4], 5, 3, split, index % 2 == 0,
                        (index / 2) % 2 == 1});
          ++index;
        }
}

TEST_F(CudaKvQuant, DecodeModesAndShapes) { run_modes_and_shapes(kModes, {16, 12}); }

// The tensor-core path at pages of several tiles: page sizes 32 and 48 (a tile starts at row 16
// or 32 of its page, so its codes, its value parameters and its ZipCache tier start there too;
// the "P/4" mixture splits the tiers inside the first tile), every mode, D 64 and 128, groups 4,
// 8 and 16; chunks of the kernel's choice, 24 slots (a tile straddles every other chunk
// boundary), 37 and one per head.
TEST_F(CudaKvQuant, DecodeTensorCoreTiles) {
  const int value_groups[4] = {0, 32, 4, 8}, splits[4] = {0, 24, 37, 1 << 20};
  int index = 0;
  for (const Mode& m : kModes)
    for (int D : {64, 128})
      for (int G : {4, 8, 16})
        for (int P : {32, 48}) {
          run_case(Case{m, 2, 2, G, D, P, value_groups[index % 4], 4, 2, splits[index % 4],
                        index % 2 == 0, (index / 2) % 2 == 1});
          ++index;
        }
}

// Long heads (up to 200 pages): the kernel's split gives many chunks per head; with and without
// probs, one KV head per sequence only, keys per channel and per token.
TEST_F(CudaKvQuant, DecodeLongHeads) {
  for (int D : {64, 128}) {
    run_case(Case{kModes[1], 2, 2, 4, D, 16, 32, 190, 2, 0, false, true});
    run_case(Case{kModes[3], 2, 2, 1, D, 16, 0, 190, 2, 0, true, false});
    run_case(Case{kModes[2], 5, 1, 8, D, 12, 4, 120, 0, 0, true, true});
    run_case(Case{kModes[2], 5, 1, 8, D, 16, 4, 150, 0, 0, true, true});
    run_case(Case{kModes[4], 2, 2, 16, D, 32, 8, 90, 5, 0, false, false});
    run_case(Case{kModes[0], 3, 2, 4, D, 16, 0, 190, 2, 0, true, false});
    run_case(Case{kTokenModes[1], 2, 2, 4, D, 16, 32, 190, 2, 0, true, false});
    run_case(Case{kTokenModes[2], 2, 2, 1, D, 16, 4, 190, 2, 0, false, true});
  }
}

// Keys per token (kernels/kv_quant.h): every token mode, page sizes 16, 12 and 32, heads whose
// last page is partly filled (its rows past the head's quantized slots 0xFF bytes, NaN if read).
// At page sizes 16 and 32 the tensor-core path meets the tile where the last page ends and the
// residual begins.
TEST_F(CudaKvQuant, DecodeTokenKeys) { run_modes_and_shapes(kTokenModes, {16, 12, 32}); }

// A Llama-3-8B-like batch (8 KV heads of 128, G = 4) at page size 16, up to 60 pages a head:
// the kernel's own split choice at a realistic size.
TEST_F(CudaKvQuant, DecodeModelSized) {
  run_case(Case{kModes[1], 4, 8, 4, 128, 16, 0, 60, 1, 0, false, false});
  run_case(Case{kModes[3], 4, 8, 4, 128, 16, 0, 60, 1, 0, true, false});
}

}  // namespace
}  // namespace dmc::cuda_test
