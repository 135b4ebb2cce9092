// GPU vs CPU reference: ThinK's kernels (kernels/think_channels.h) and the decode attention over
// its pruned pages (kernels/decode_attention.h, paged_decode_attention_think). Fresh random
// inputs on every run.
//   Query energy: think_observe_queries over n rows and every KV head, GQA groups 1, 4 and 8,
//   with and without the control channel, against the CPU function per head (fp32).
//   Page pruning: think_prune_pages over entries of which some close no page (page id −1), rows
//   gathered in shuffled order from a pool whose other rows are 1e30 (a read of one moves a
//   score), head dims 64 and 128, page sizes 12 and 16, kept channels 1, 5, 24 and D; energies
//   with zeros (the control channel's) and two channels whose scores tie exactly (same keys,
//   same energy: the lower one must win). Masks, pruned keys and values must equal
//   think_select_channels and think_prune_rows on the same rows bit for bit; a closed entry's
//   energy is 0 after, the others' untouched; pool pages no entry names stay poisoned.
//   Attention: pages of random masks, GQA groups 1, 4, 8 and 16, heads of random lengths in
//   pages and in their residual blocks (the edge heads as in test_cuda_kv_quant.cpp), split
//   chunks of the kernel's choice, 37 slots or one per head, with and without probs and the
//   control channel; groups of 4 to 16 at page sizes 16 and 32 take the tensor-core path, the
//   others and page size 12 the CUDA-core path. Spare pages and residual rows are NaN, so a
//   wrong read fails; outputs and probs are NaN-poisoned; a second identical call is
//   bit-identical.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/decode_attention.h"
#include "kernels/think_channels.h"
#include "tests/cuda/cuda_test_util.h"

namespace dmc::cuda_test {
namespace {
namespace K = dmc::kernels;
namespace C = dmc::cuda;

class CudaThink : public ::testing::Test {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

TEST_F(CudaThink, ObserveQueriesAddsEachGroupsEnergy) {
  for (int G : {1, 4, 8})
    for (bool exclude_ctrl : {false, true}) {
      const int n = 5, Hkv = 2, H = Hkv * G, D = 64;
      auto ed = randu(static_cast<size_t>(n) * Hkv * D, 0.0, 3.0);
      auto qd = randn(static_cast<size_t>(n) * H * D);
      const std::vector<float> energy = to_f32(ed);
      const std::vector<bf16> qb = to_bf16(qd);
      DevBuf<float> denergy(energy);
      DevBuf<bf16> dq(qb);
      C::think_observe_queries(denergy, dq, n, H, Hkv, D, exclude_ctrl);
      EXPECT_EQ(cudaGetLastError(), cudaSuccess);
      const std::vector<float> got = denergy.download();

      std::vector<float> want = energy;
      const std::vector<float> qf(qd.begin(), qd.end());
      for (int i = 0; i < n; ++i)
        for (int h = 0; h < Hkv; ++h)
          K::think_observe_queries(want.data() + (static_cast<size_t>(i) * Hkv + h) * D,
                                   qf.data() + (static_cast<size_t>(i) * H + h * G) * D, G, D,
                                   exclude_ctrl);
      const std::string what =
          "think observe G" + std::to_string(G) + (exclude_ctrl ? " ctrl" : "");
      expect_close(what.c_str(), got, as_double(want), kF32Tol);
      for (size_t head = 0; exclude_ctrl && head < static_cast<size_t>(n) * Hkv; ++head)
        EXPECT_EQ(got[head * D + D - 1], energy[head * D + D - 1])
            << what << ": the control channel's energy is never added to";
    }
}

void run_prune(int D, int P, int kept) {
  const std::string what = "think prune D" + std::to_string(D) + " P" + std::to_string(P) +
                           " kept" + std::to_string(kept);
  const int entries = 6, npages = entries + 2, mask_bytes = K::ThinkMaskBytes(D);
  // Entries 1 and 4 close nothing; the others take pages in shuffled order.
  const std::vector<int32_t> perm = shuffled_ids(npages);
  std::vector<int32_t> page_ids(entries);
  for (int j = 0; j < entries; ++j) page_ids[j] = j == 1 || j == 4 ? -1 : perm[j];

  // The source pool: every entry's P rows somewhere among spare rows of 1e30.
  const int pool_rows = entries * P + 7;
  const std::vector<int32_t> order = shuffled_ids(pool_rows);
  std::vector<int32_t> rows(order.begin(), order.begin() + static_cast<long>(entries) * P);
  std::vector<double> kd(static_cast<size_t>(pool_rows) * D, 1e30), vd(kd.size(), 1e30);
  auto energy_d = randu(static_cast<size_t>(entries) * D, 0.0, 2.0);
  for (int j = 0; j < entries; ++j) {
    const std::vector<double> keys = randn(static_cast<size_t>(P) * D);
    const std::vector<double> values = randn(static_cast<size_t>(P) * D);
    for (int r = 0; r < P; ++r) {
      const size_t row = static_cast<size_t>(rows[static_cast<size_t>(j) * P + r]) * D;
      std::copy_n(keys.begin() + static_cast<long>(r) * D, D, kd.begin() + row);
      std::copy_n(values.begin() + static_cast<long>(r) * D, D, vd.begin() + row);
      kd[row + 9] = kd[row + 3];  // channels 3 and 9 tie: same keys, same energy
    }
    double* e = energy_d.data() + static_cast<size_t>(j) * D;
    e[9] = e[3] = 2.5;
    e[D - 1] = 0.0;     // the control channel scores 0
    e[5] = 0.0;
  }
  const std::vector<bf16> kb = to_bf16(kd), vb = to_bf16(vd);
  const std::vector<float> energy = to_f32(energy_d);

  DevBuf<bf16> dk(kb), dv(vb);
  DevBuf<bf16> dk_pages(static_cast<size_t>(npages) * P * kept),
      dv_pages(static_cast<size_t>(npages) * P * D);
  DevBuf<uint8_t> dmasks(static_cast<size_t>(npages) * mask_bytes);
  DevBuf<float> denergy(energy);
  DevBuf<int32_t> dids(page_ids), drows(rows);
  dk_pages.poison();
  dv_pages.poison();
  dmasks.poison();
  C::think_prune_pages(dk_pages, dv_pages, dmasks, denergy, dids, dk, dv, drows, entries, P, D,
                       kept);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  const auto k_pages = dk_pages.download();
  const auto v_pages = dv_pages.download();
  const auto masks = dmasks.download();
  const auto energy_after = denergy.download();

  const std::vector<float> kf(kd.begin(), kd.end());
  std::vector<bool> named(npages, false);
  for (int j = 0; j < entries; ++j) {
    const float* e = energy.data() + static_cast<size_t>(j) * D;
    const float* e_after = energy_after.data() + static_cast<size_t>(j) * D;
    if (page_ids[j] < 0) {
      EXPECT_EQ(std::memcmp(e, e_after, sizeof(float) * D), 0) << what << ": entry " << j;
      continue;
    }
    const int page = page_ids[j];
    named[page] = true;
    std::vector<float> keys(static_cast<size_t>(P) * D);
    for (int r = 0; r < P; ++r)
      std::copy_n(kf.begin() + static_cast<long>(rows[static_cast<size_t>(j) * P + r]) * D, D,
                  keys.begin() + static_cast<long>(r) * D);
    std::vector<uint8_t> mask(mask_bytes);
    K::think_select_channels(mask.data(), e, keys.data(), P, D, kept);
    std::vector<float> pruned(static_cast<size_t>(P) * kept);
    K::think_prune_rows(pruned.data(), keys.data(), mask.data(), P, D, kept);
    EXPECT_EQ(std::memcmp(mask.data(), masks.data() + static_cast<size_t>(page) * mask_bytes,
                          mask_bytes),
              0)
        << what << ": the mask of entry " << j;
    // Channels 3 and 9 tie: the lower one is never the one left out.
    EXPECT_FALSE(K::ThinkKept(mask.data(), 9) && !K::ThinkKept(mask.data(), 3)) << what;
    for (size_t i = 0; i < pruned.size(); ++i)
      ASSERT_EQ(__bfloat162float(k_pages[static_cast<size_t>(page) * P * kept + i]), pruned[i])
          << what << ": pruned key " << i << " of entry " << j;
    for (int r = 0; r < P; ++r) {
      const size_t from = static_cast<size_t>(rows[static_cast<size_t>(j) * P + r]) * D;
      const size_t to = (static_cast<size_t>(page) * P + r) * D;
      EXPECT_EQ(std::memcmp(&v_pages[to], &vb[from], sizeof(bf16) * D), 0)
          << what << ": value row " << r << " of entry " << j;
    }
    for (int c = 0; c < D; ++c) EXPECT_EQ(e_after[c], 0.f) << what << ": energy of entry " << j;
  }
  for (int page = 0; page < npages; ++page) {  // pages no entry names stay as they were
    if (named[page]) continue;
    for (int b = 0; b < mask_bytes; ++b)
      EXPECT_EQ(masks[static_cast<size_t>(page) * mask_bytes + b], 0xFF) << what;
  }
}

TEST_F(CudaThink, PrunePagesAsTheCpuReference) {
  for (int D : {64, 128})
    for (int P : {12, 16})
      for (int kept : {1, 5, 24, D}) run_prune(D, P, kept);
}

struct Case {
  int B, Hkv, G, D, page_size, kept, max_pages;
  int split_slots;  // 0: the kernel chooses
  bool probs, exclude_ctrl;
};

std::string name_of(const Case& c, const char* what) {
  return std::string("think decode ") + what + " D" + std::to_string(c.D) + " P" +
         std::to_string(c.page_size) + " kept" + std::to_string(c.kept) + " B" +
         std::to_string(c.B) + " Hkv" + std::to_string(c.Hkv) + " G" + std::to_string(c.G) +
         " pages<=" + std::to_string(c.max_pages) +
         (c.split_slots ? " split" + std::to_string(c.split_slots) : std::string(" split auto")) +
         (c.probs ? " probs" : "") + (c.exclude_ctrl ? " ctrl" : "");
}

void run_decode(const Case& c) {
  const int H = c.Hkv * c.G, D = c.D, P = c.page_size, heads = c.B * c.Hkv;
  const int residual = P, mask_bytes = K::ThinkMaskBytes(D);
  std::vector<int> pages_of, r_len;
  random_settled_lengths(heads, c.max_pages, residual, &pages_of, &r_len);
  std::vector<int> p_len(heads);
  for (int h = 0; h < heads; ++h) p_len[h] = pages_of[h] * P;

  // Pages in shuffled order among spare ones (NaN rows, every unused table entry names one);
  // each page's mask keeps `kept` channels at random.
  const int spare = 3;
  const int npages = std::accumulate(pages_of.begin(), pages_of.end(), 0) + spare;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> kd(static_cast<size_t>(npages) * P * c.kept, nan);
  std::vector<double> vd(static_cast<size_t>(npages) * P * D, nan);
  std::vector<uint8_t> masks(static_cast<size_t>(npages) * mask_bytes, 0xFF);
  std::vector<int> channels(D);
  std::iota(channels.begin(), channels.end(), 0);
  std::vector<int32_t> table;
  shuffled_page_tables(pages_of, c.max_pages, spare, &table, [&](int32_t page) {
    std::shuffle(channels.begin(), channels.end(), rng());
    uint8_t* mask = masks.data() + static_cast<size_t>(page) * mask_bytes;
    std::fill_n(mask, mask_bytes, uint8_t{0});
    for (int k = 0; k < c.kept; ++k) mask[channels[k] / 8] |= uint8_t(1u << (channels[k] % 8));
    const std::vector<double> keys = randn(static_cast<size_t>(P) * c.kept);
    const std::vector<double> values = randn(static_cast<size_t>(P) * D);
    std::copy(keys.begin(), keys.end(), kd.begin() + static_cast<size_t>(page) * P * c.kept);
    std::copy(values.begin(), values.end(), vd.begin() + static_cast<size_t>(page) * P * D);
  });
  // Residual blocks: one per head, shuffled among spare ones; rows no head holds are NaN.
  const int nblocks = heads + 2;
  const std::vector<int32_t> block_perm = shuffled_ids(nblocks);
  const std::vector<int32_t> blocks(block_perm.begin(), block_perm.begin() + heads);
  std::vector<double> rkd(static_cast<size_t>(nblocks) * residual * D, nan), rvd(rkd.size(), nan);
  for (int h = 0; h < heads; ++h) {
    const std::vector<double> keys = randn(static_cast<size_t>(r_len[h]) * D);
    const std::vector<double> values = randn(static_cast<size_t>(r_len[h]) * D);
    const size_t base = static_cast<size_t>(blocks[h]) * residual * D;
    std::copy(keys.begin(), keys.end(), rkd.begin() + base);
    std::copy(values.begin(), values.end(), rvd.begin() + base);
  }

  auto qd = randn(static_cast<size_t>(c.B) * H * D);
  if (c.exclude_ctrl)  // a large control channel: counting it in q·k would change everything
    for (int bh = 0; bh < c.B * H; ++bh) qd[static_cast<size_t>(bh) * D + D - 1] = 40.0;
  auto qb = to_bf16(qd), kb = to_bf16(kd), vb = to_bf16(vd), rkb = to_bf16(rkd),
       rvb = to_bf16(rvd);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const int stride = c.max_pages * P + residual + 3;
  const size_t out_n = static_cast<size_t>(c.B) * H * D;
  const size_t probs_n = c.probs ? static_cast<size_t>(c.B) * H * stride : 1;

  DevBuf<bf16> dq(qb), dk(kb), dv(vb), drk(rkb), drv(rvb), dout(out_n);
  DevBuf<uint8_t> dmasks(masks);
  DevBuf<int32_t> dtable(table), dblocks(blocks);
  DevBuf<int> dplen(p_len), drlen(r_len);
  DevBuf<float> dprobs(probs_n);
  auto launch = [&](bf16* out, float* probs) {
    C::paged_decode_attention_think(out, c.probs ? probs : nullptr, stride, dq, dk, dv, dmasks,
                                    c.kept, dtable, dplen, c.max_pages, P, drk, drv, dblocks,
                                    drlen, residual, c.B, H, c.Hkv, D, c.exclude_ctrl, scale,
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
  K::paged_decode_attention_think<double>(
      ref.data(), c.probs ? ref_probs.data() : nullptr, stride, qd.data(), kd.data(), vd.data(),
      masks.data(), c.kept, table.data(), p_len.data(), c.max_pages, P, rkd.data(), rvd.data(),
      blocks.data(), r_len.data(), residual, c.B, H, c.Hkv, D, c.exclude_ctrl, scale);
  expect_close(name_of(c, "out").c_str(), out, ref, kBf16Tol);

  if (c.probs) {
    std::vector<int> slots(heads);
    for (int h = 0; h < heads; ++h) slots[h] = p_len[h] + r_len[h];
    expect_probs(name_of(c, "probs"), probs, ref_probs, slots, c.B, H, c.G, stride, 1e-4);
  }

  expect_rerun_identical(name_of(c, "out"), launch, out, probs);
}

// D 64, 128 x GQA 1, 4, 8, 16 x page size 12, 16, 32; kept channels, the split, probs and the
// control channel cycle over the cases.
TEST_F(CudaThink, DecodeShapes) {
  const int splits[3] = {0, 37, 1 << 20};
  int index = 0;
  for (int D : {64, 128})
    for (int G : {1, 4, 8, 16})
      for (int P : {12, 16, 32}) {
        const int kept_of[4] = {1, 7, D / 2, D};
        run_decode(Case{3, 2, G, D, P, kept_of[index % 4], 5, splits[index % 3], index % 2 == 0,
                        (index / 2) % 2 == 1});
        ++index;
      }
}

// Long heads (up to 150 pages): many chunks per head, both paths.
TEST_F(CudaThink, DecodeLongHeads) {
  for (int D : {64, 128}) {
    run_decode(Case{2, 2, 4, D, 16, 24, 150, 0, true, true});
    run_decode(Case{2, 2, 1, D, 16, 24, 150, 0, true, false});
    run_decode(Case{4, 8, 4, D, 16, D / 4, 60, 0, false, false});
  }
}

}  // namespace
}  // namespace dmc::cuda_test
