// GPU vs CPU reference: paged decode attention (kernels/decode_attention.h). Fresh random inputs
// on every run: random lengths per (sequence, KV head) from 1 to several pages (length 1, exactly
// full pages and one past a page boundary always included), pages shuffled in the pool, page
// sizes 1, 16 and 64, head dims 64 and 128, GQA groups 1, 2, 3, 4, 8, 16 and 32 (the CUDA-core
// kernel and the tensor-core one, which takes groups of 4 to 16), one chunk per head and
// several (flash-decoding), with and without the control channel and the attention weights.
// Every pool slot that no head owns, and every unused page-table entry (pointing at such a page),
// is NaN, so a read past a head's length or through a wrong page shows up as a failed
// comparison; the outputs are NaN-poisoned before the launch, so an unwritten element fails too.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/decode_attention.h"
#include "tests/cuda/cuda_test_util.h"

namespace dmc::cuda_test {
namespace {
namespace K = dmc::kernels;
namespace C = dmc::cuda;

class CudaDecode : public ::testing::Test {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

struct Case {
  int B, Hkv, G, D, page_size, max_len;  // max_len: slots the page table can hold (rounded up)
  int split_slots;                       // 0: the kernel chooses
  bool probs, exclude_ctrl;
  double scale_mult;  // scale = scale_mult / sqrt(D)
  bool empty_heads = false;  // heads 3 and 4 hold no slot: their outputs are zeros
};

std::string name_of(const Case& c, const char* what) {
  return std::string("decode ") + what + " B" + std::to_string(c.B) + " Hkv" +
         std::to_string(c.Hkv) + " G" + std::to_string(c.G) + " D" + std::to_string(c.D) +
         " ps" + std::to_string(c.page_size) + " len<=" + std::to_string(c.max_len) +
         (c.split_slots ? " split" + std::to_string(c.split_slots) : std::string(" split auto")) +
         (c.exclude_ctrl ? " ctrl" : "") + (c.scale_mult != 1.0 ? " sharp" : "");
}

void run_case(const Case& c) {
  const int H = c.Hkv * c.G, D = c.D, ps = c.page_size;
  const int heads = c.B * c.Hkv;
  const int max_pages = (c.max_len + ps - 1) / ps;
  const int cap = max_pages * ps;

  // Lengths: every fourth head a whole number of full pages, the rest anywhere in 1 .. cap;
  // head 0 fills its page table exactly, head 1 holds one slot, head 2 one past a page boundary.
  std::vector<int> len(heads);
  std::uniform_int_distribution<int> any_len(1, cap), any_pages(1, max_pages);
  for (int h = 0; h < heads; ++h) len[h] = h % 4 == 3 ? any_pages(rng()) * ps : any_len(rng());
  len[0] = cap;
  if (heads > 1) len[1] = 1;
  if (heads > 2) len[2] = std::min(cap, ps + 1);
  if (c.empty_heads)
    for (int h = 3; h < std::min(heads, 5); ++h) len[h] = 0;

  // Pool: the used pages in shuffled order plus spare pages; spare pages are all NaN.
  int used = 0;
  for (int n : len) used += (n + ps - 1) / ps;
  const int spare = 3 + used / 4;
  const int npages = used + spare;
  const std::vector<int32_t> perm = shuffled_ids(npages);
  const int32_t nan_page = perm[npages - 1];
  std::vector<int32_t> table(static_cast<size_t>(heads) * max_pages, nan_page);
  const size_t pool_n = static_cast<size_t>(npages) * ps * D;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> kd(pool_n, nan), vd(pool_n, nan);
  std::normal_distribution<double> normal(0.0, 1.0);
  int next = 0;
  for (int h = 0; h < heads; ++h) {
    int32_t* pages = table.data() + static_cast<size_t>(h) * max_pages;
    for (int pg = 0; pg < (len[h] + ps - 1) / ps; ++pg) pages[pg] = perm[next++];
    for (int i = 0; i < len[h]; ++i) {
      const size_t row = static_cast<size_t>(pages[i / ps]) * ps + i % ps;
      for (int d = 0; d < D; ++d) {
        kd[row * D + d] = normal(rng());
        vd[row * D + d] = normal(rng());
      }
    }
  }
  auto qd = randn(static_cast<size_t>(c.B) * H * D);
  if (c.exclude_ctrl)  // a large control channel: counting it in q·k would change everything
    for (int bh = 0; bh < c.B * H; ++bh) qd[static_cast<size_t>(bh) * D + D - 1] = 40.0;
  auto qb = to_bf16(qd), kb = to_bf16(kd), vb = to_bf16(vd);
  const float scale = static_cast<float>(c.scale_mult / std::sqrt(static_cast<double>(D)));
  const int stride = cap + 3;

  DevBuf<bf16> dq(qb), dk(kb), dv(vb), dout(static_cast<size_t>(c.B) * H * D),
      dout2(static_cast<size_t>(c.B) * H * D);
  DevBuf<int32_t> dtable(table);
  DevBuf<int> dlen(len);
  DevBuf<float> dprobs(c.probs ? static_cast<size_t>(c.B) * H * stride : 1);
  dout.poison();
  dout2.poison();
  dprobs.poison();
  C::paged_decode_attention(dout, c.probs ? dprobs.ptr : nullptr, stride, dq, dk, dv, dtable, dlen,
                            max_pages, ps, c.B, H, c.Hkv, D, c.exclude_ctrl, scale, nullptr,
                            c.split_slots);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  const auto out = dout.download();
  const auto probs = dprobs.download();

  std::vector<double> ref(static_cast<size_t>(c.B) * H * D);
  std::vector<double> ref_probs(c.probs ? static_cast<size_t>(c.B) * H * stride : 0, 0.0);
  K::paged_decode_attention<double>(ref.data(), c.probs ? ref_probs.data() : nullptr, stride,
                                    qd.data(), kd.data(), vd.data(), table.data(), len.data(),
                                    max_pages, ps, c.B, H, c.Hkv, D, c.exclude_ctrl, scale);
  // An empty head attends to nothing: the reference's 0 / 0, the kernel's defined zeros.
  for (int bh = 0; bh < c.B * H; ++bh)
    if (len[(bh / H) * c.Hkv + (bh % H) / c.G] == 0)
      std::fill_n(ref.begin() + static_cast<size_t>(bh) * D, D, 0.0);
  expect_close(name_of(c, "out").c_str(), out, ref, kBf16Tol);

  if (c.probs) expect_probs(name_of(c, "probs"), probs, ref_probs, len, c.B, H, c.G, stride, 1e-4);

  // Same inputs again: bit-identical (fixed chunks, fixed reduction order, no races).
  C::paged_decode_attention(dout2, nullptr, 0, dq, dk, dv, dtable, dlen, max_pages, ps, c.B, H,
                            c.Hkv, D, c.exclude_ctrl, scale, nullptr, c.split_slots);
  const auto out2 = dout2.download();
  if (c.probs) {
    // out2 was made without probs: the same kernel path only when there is one chunk per head;
    // compare against the reference instead.
    expect_close(name_of(c, "out (no probs)").c_str(), out2, ref, kBf16Tol);
  } else {
    EXPECT_EQ(std::memcmp(out.data(), out2.data(), sizeof(bf16) * out.size()), 0)
        << name_of(c, "out") << ": two runs differ";
  }
}

// Page sizes 1, 16, 64 x D 32, 64, 128 x GQA 1, 4 x {kernel's choice, 37-slot chunks (off every
// page and row-step boundary), one chunk per head}; the control channel on the odd ones.
TEST_F(CudaDecode, PagedShapes) {
  for (int ps : {1, 16, 64})
    for (int D : {32, 64, 128})
      for (int G : {1, 4})
        for (int split : {0, 37, 1 << 20}) {
          const int max_len = ps == 1 ? 200 : 5 * ps + (ps == 16 ? 7 : 0);
          const bool ctrl = (G + split) % 2 == 1;
          run_case(Case{3, 3, G, D, ps, max_len, split, split == 37, ctrl, 1.0});
        }
}

// Other group sizes: on CUDA cores 2 (two heads per CTA), 3 (one per CTA, three CTAs) and 32
// (eight CTAs of four); on tensor cores 8 and 16 (the whole M = 16 of the mma); sharp softmax
// (scale x 4) so a wrong maximum or merge shows.
TEST_F(CudaDecode, PagedGroups) {
  for (int G : {2, 3, 8, 16, 32})
    for (int D : {32, 64, 128}) {
      run_case(Case{2, 2, G, D, 16, 150, 0, false, false, 4.0});
      run_case(Case{2, 2, G, D, 16, 150, 48, true, true, 4.0});
    }
}

// Long heads (up to ~3000 slots): the automatic split gives many chunks per head; with and without
// weights, and one head per sequence only (B = 5, Hkv = 1).
TEST_F(CudaDecode, PagedLongHeads) {
  for (int D : {32, 64, 128}) {
    run_case(Case{2, 2, 4, D, 16, 3000, 0, false, true, 1.0});
    run_case(Case{2, 2, 1, D, 64, 3000, 0, true, false, 1.0});
    run_case(Case{5, 1, 1, D, 1, 1500, 0, false, false, 2.0});
    run_case(Case{2, 4, 1, D, 16, 3000, 1 << 20, false, false, 1.0});  // one CTA per head
  }
}

// Heads with no slot among split and one-chunk heads, with and without weights, on CUDA cores
// (G 1) and tensor cores (G 8): every chunk of an empty head is past its length, and its output
// must still be written (zeros), by the main kernel or by the combine.
TEST_F(CudaDecode, PagedEmptyHeads) {
  for (int G : {1, 8})
    for (int split : {48, 1 << 20})
      for (bool probs : {false, true})
        run_case(Case{3, 2, G, 64, 16, 200, split, probs, false, 1.0, /*empty_heads=*/true});
}

// A Llama-2-7B-like batch (32 KV heads of 128, no GQA) and a Llama-3-8B-like one (8 KV heads,
// G = 4), page size 16, lengths up to 1000: the kernel's own split choice at a realistic size.
TEST_F(CudaDecode, PagedModelSized) {
  run_case(Case{4, 32, 1, 128, 16, 1000, 0, false, true, 1.0});
  run_case(Case{4, 8, 4, 128, 16, 1000, 0, false, true, 1.0});
}

}  // namespace
}  // namespace dmc::cuda_test
