// GPU vs CPU reference for the fused DMC attention kernels: causal, GQA, the on-the-fly DMC bias
// (soft log(1 - alpha) values, hard -50000 values, or none), DMS's mask mode (the bias only where
// query - key > w; soft values or the hard -inf), exclude_ctrl, head dims 64 and 128 (and 32 in
// the forward, which inference's prompts run), sequence lengths that are not multiples of the
// tiles. Each case runs with each kernel forced
// (the portable mma.sync ones and, on Hopper, the sm90 ones on both their schedules):
// the forward (out, lse), then the backward from that forward's out and lse (dq, dk, dv, dmask,
// all accumulated into random initial values).
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/dmc_attention.h"
#include "tests/cuda/cuda_test_util.h"

namespace dmc::cuda_test {
namespace {
namespace K = dmc::kernels;
namespace C = dmc::cuda;

enum class MaskKind { kNone, kSoft, kHard, kEvicted };  // kEvicted: DMS's hard -inf

struct Case {
  int B, T, H, Hkv, D;
  bool exclude_ctrl;
  MaskKind mask;
  double q_scale;  // larger values give peakier softmax rows
  int window = 0;  // DMS: the mask applies where query - key > window
};

std::string name_of(const Case& c) {
  return "B" + std::to_string(c.B) + " T" + std::to_string(c.T) + " H" + std::to_string(c.H) +
         "/" + std::to_string(c.Hkv) + " D" + std::to_string(c.D) +
         (c.exclude_ctrl ? " xctrl" : "") +
         (c.mask == MaskKind::kNone   ? " nomask"
          : c.mask == MaskKind::kSoft ? " soft"
          : c.mask == MaskKind::kHard ? " hard"
                                      : " evicted") +
         (c.window > 0 ? " w" + std::to_string(c.window) : "");
}

std::string kernel_suffix(C::AttentionKernel kernel) {
  return kernel == C::AttentionKernel::kSm90             ? " sm90"
         : kernel == C::AttentionKernel::kSm90Persistent ? " sm90_persistent"
                                                         : " mma_sync";
}

// The forward, then (with_backward) the backward.
void run_case(const Case& c, C::AttentionKernel kernel, bool with_backward = true) {
  const size_t nq = static_cast<size_t>(c.B) * c.T * c.H * c.D;
  const size_t nk = static_cast<size_t>(c.B) * c.T * c.Hkv * c.D;
  const size_t nm = static_cast<size_t>(c.B) * c.T * c.Hkv;
  const size_t nl = static_cast<size_t>(c.B) * c.H * c.T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.D));
  auto q = randn(nq, c.q_scale), k = randn(nk), v = randn(nk);
  std::vector<double> mask(nm, 0.0);
  if (c.mask == MaskKind::kSoft) {
    auto a = randu(nm, 0.0, 0.999);
    for (size_t i = 0; i < nm; ++i) mask[i] = std::log1p(-a[i]);
  } else if (c.mask == MaskKind::kHard) {
    auto a = randu(nm, 0.0, 1.0);
    for (size_t i = 0; i < nm; ++i) mask[i] = a[i] < 0.3 ? -50000.0 : 0.0;
  } else if (c.mask == MaskKind::kEvicted) {
    auto a = randu(nm, 0.0, 1.0);
    for (size_t i = 0; i < nm; ++i) mask[i] = a[i] < 0.6 ? -INFINITY : 0.0;
  }
  auto qb = to_bf16(q), kb = to_bf16(k), vb = to_bf16(v);
  auto mf = to_f32(mask);
  DevBuf<bf16> dq(qb), dk(kb), dv(vb), dout(nq);
  DevBuf<float> dmask(mf), dlse(nl);
  dout.poison();
  dlse.poison();
  const float* mptr = c.mask == MaskKind::kNone ? nullptr : dmask.ptr;
  C::dmc_attention_forward(dout, dlse, dq, dk, dv, mptr, c.B, c.T, c.H, c.Hkv, c.D, c.exclude_ctrl,
                           scale, nullptr, c.window, kernel);
  std::vector<double> out(nq), lse(nl);
  const double* mref = c.mask == MaskKind::kNone ? nullptr : mask.data();
  K::dmc_attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), mref, c.B,
                                   c.T, c.H, c.Hkv, c.D, c.exclude_ctrl, scale, c.window);
  const std::string n = name_of(c) + kernel_suffix(kernel);
  expect_close(("attn fwd out  " + n).c_str(), dout.download(), out, kBf16Tol);
  expect_close(("attn fwd lse  " + n).c_str(), dlse.download(), lse, 1e-4);
  if (!with_backward) return;

  auto go = randn(nq);
  auto gob = to_bf16(go);
  DevBuf<bf16> dgo(gob);
  // Added onto random values (+=), and written (=) into NaN: every element of dq, dk, dv and
  // dmask must be stored, the control channel's zeros too.
  for (bool accumulate : {true, false}) {
    auto gq = grad_start(nq, accumulate, 0.01), gk = grad_start(nk, accumulate, 0.01),
         gv = grad_start(nk, accumulate, 0.01), gm = grad_start(nm, accumulate, 0.01);
    auto gqb = to_bf16(gq), gkb = to_bf16(gk), gvb = to_bf16(gv);
    auto gmf = to_f32(gm);
    DevBuf<bf16> dgq(gqb), dgk(gkb), dgv(gvb);
    DevBuf<float> dgm(gmf);
    C::dmc_attention_backward(dgq, dgk, dgv, mptr ? dgm.ptr : nullptr, dgo, dq, dk, dv, mptr,
                              dout, dlse, c.B, c.T, c.H, c.Hkv, c.D, c.exclude_ctrl, scale,
                              accumulate, nullptr, c.window, kernel);
    K::dmc_attention_backward<double>(gq.data(), gk.data(), gv.data(), mref ? gm.data() : nullptr,
                                      go.data(), q.data(), k.data(), v.data(), mref, out.data(),
                                      lse.data(), c.B, c.T, c.H, c.Hkv, c.D, c.exclude_ctrl, scale,
                                      accumulate, c.window);
    expect_close(with_mode("attn bwd dq   " + n, accumulate), dgq.download(), gq, kBf16Tol);
    expect_close(with_mode("attn bwd dk   " + n, accumulate), dgk.download(), gk, kBf16Tol);
    expect_close(with_mode("attn bwd dv   " + n, accumulate), dgv.download(), gv, kBf16Tol);
    if (mref)
      expect_close(with_mode("attn bwd dmask " + n, accumulate), dgm.download(), gm, kBf16Tol);
  }
}

class CudaAttention : public ::testing::TestWithParam<std::tuple<Case, C::AttentionKernel>> {
 protected:
  void SetUp() override {
    DMC_REQUIRE_GPU();
    if (std::get<1>(GetParam()) != C::AttentionKernel::kMmaSync && !C::device_is_sm90())
      GTEST_SKIP() << "the sm90 kernels need a Hopper GPU";
  }
};

TEST_P(CudaAttention, MatchesCpuReference) {
  run_case(std::get<0>(GetParam()), std::get<1>(GetParam()));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaAttention,
    ::testing::Combine(
        ::testing::Values(Case{2, 200, 4, 2, 64, true, MaskKind::kSoft, 1.0},
                          Case{1, 333, 2, 1, 128, false, MaskKind::kNone, 1.0},
                          Case{2, 130, 4, 4, 128, true, MaskKind::kHard, 1.0},
                          Case{1, 1100, 2, 1, 128, true, MaskKind::kSoft, 2.0},
                          Case{1, 257, 8, 2, 64, false, MaskKind::kSoft, 3.0},
                          Case{1, 1, 2, 1, 64, true, MaskKind::kSoft, 1.0},
                          Case{3, 17, 2, 2, 128, true, MaskKind::kSoft, 1.0},
                          // DMS: bands narrower than, across and wider than a tile
                          Case{2, 300, 4, 2, 64, false, MaskKind::kSoft, 1.0, 5},
                          Case{1, 257, 4, 1, 128, false, MaskKind::kSoft, 2.0, 70},
                          Case{2, 200, 4, 2, 64, false, MaskKind::kEvicted, 1.0, 3},
                          Case{1, 129, 2, 2, 128, false, MaskKind::kEvicted, 1.0, 100},
                          // head dim 128 (the sm90 backward): MHA and GQA, B 2, T past the
                          // 128-key and 64-query tiles, each mask kind, exclude_ctrl on and off
                          Case{2, 200, 4, 1, 128, true, MaskKind::kSoft, 1.0},
                          Case{2, 333, 4, 2, 128, false, MaskKind::kSoft, 2.0},
                          Case{2, 333, 4, 4, 128, true, MaskKind::kHard, 1.0},
                          Case{2, 200, 4, 2, 128, false, MaskKind::kNone, 1.0},
                          Case{2, 200, 4, 4, 128, true, MaskKind::kNone, 3.0},
                          Case{2, 333, 4, 1, 128, false, MaskKind::kHard, 1.0},
                          Case{2, 256, 4, 2, 128, true, MaskKind::kSoft, 1.0},
                          Case{2, 64, 4, 1, 128, true, MaskKind::kSoft, 1.0},
                          Case{2, 1, 4, 2, 128, true, MaskKind::kSoft, 1.0},
                          Case{2, 333, 4, 2, 128, true, MaskKind::kEvicted, 1.0, 3},
                          // more than 32 KV heads: the sm90 forward's bias rows are transposed
                          // from the mask in 32-head blocks, the last one partial
                          Case{1, 150, 48, 48, 128, true, MaskKind::kSoft, 1.0},
                          // head dim 64 (the sm90 backward's 128-query tiles): MHA and GQA up to
                          // 8 query heads a KV head, T short of, at and past the 128 x 128 tiles,
                          // each mask kind and DMS's bands, exclude_ctrl on and off
                          Case{2, 333, 4, 1, 64, true, MaskKind::kSoft, 1.0},
                          Case{2, 200, 4, 4, 64, false, MaskKind::kSoft, 2.0},
                          Case{2, 333, 4, 2, 64, true, MaskKind::kHard, 1.0},
                          Case{2, 130, 4, 4, 64, false, MaskKind::kHard, 1.0},
                          Case{2, 200, 4, 2, 64, false, MaskKind::kNone, 1.0},
                          Case{2, 333, 4, 4, 64, true, MaskKind::kNone, 3.0},
                          Case{2, 256, 8, 1, 64, true, MaskKind::kSoft, 1.0},
                          Case{2, 128, 4, 2, 64, true, MaskKind::kSoft, 1.0},
                          Case{3, 17, 2, 2, 64, true, MaskKind::kSoft, 1.0},
                          Case{1, 1100, 2, 1, 64, true, MaskKind::kSoft, 2.0},
                          Case{1, 257, 4, 1, 64, false, MaskKind::kSoft, 2.0, 70},
                          Case{1, 333, 2, 2, 64, false, MaskKind::kEvicted, 1.0, 150},
                          Case{2, 333, 4, 2, 64, true, MaskKind::kEvicted, 1.0, 3}),
        ::testing::Values(C::AttentionKernel::kMmaSync, C::AttentionKernel::kSm90,
                          C::AttentionKernel::kSm90Persistent)),
    [](const ::testing::TestParamInfo<std::tuple<Case, C::AttentionKernel>>& info) {
      std::string suffix = kernel_suffix(std::get<1>(info.param));
      suffix[0] = '_';
      return "case" + std::to_string(info.index / 3) + suffix;
    });

// Head dim 32 (the quickstart's models, whose prompts the GPU engine prefills with this forward):
// the portable kernel, whose 64-byte rows take the 4-chunk swizzle; MHA and GQA, each mask kind
// and DMS's bands, exclude_ctrl on and off, T off the tiles.
TEST(CudaAttentionHeadDim32, ForwardMatchesCpuReference) {
  DMC_REQUIRE_GPU();
  for (const Case& c : {Case{2, 200, 4, 2, 32, true, MaskKind::kSoft, 1.0},
                        Case{1, 333, 4, 4, 32, false, MaskKind::kNone, 2.0},
                        Case{2, 130, 8, 2, 32, true, MaskKind::kHard, 1.0},
                        Case{1, 1, 2, 1, 32, true, MaskKind::kSoft, 1.0},
                        Case{1, 257, 4, 2, 32, false, MaskKind::kSoft, 2.0, 5},
                        Case{2, 300, 4, 2, 32, false, MaskKind::kEvicted, 1.0, 3}})
    run_case(c, C::AttentionKernel::kMmaSync, /*with_backward=*/false);
}

// The Hopper kernels' persistent schedules against their grid schedules on shapes of many more
// tiles than SMs (so that each CTA of a persistent kernel takes several, across heads, sections
// and the stages' phases): each tile is computed by the same code in the same order, so the
// forward's out and lse and the backward's dk, dv and dmask must be equal bit for bit; dq only
// within bf16 round-off, as its fp32 accumulator takes the key tiles' TMA reduce-adds in the
// order they happen to arrive. Odd query-tile counts per key tile (T 8000; G 3 at head dim 64)
// start the backward's key tiles on either stage and dS buffer. The CPU reference cases above
// have fewer tiles than a Hopper GPU has SMs.
TEST(CudaAttentionSchedules, PersistentEqualsGrid) {
  DMC_REQUIRE_GPU();
  if (!C::device_is_sm90()) GTEST_SKIP() << "the sm90 kernels need a Hopper GPU";
  const Case cases[] = {Case{4, 2048, 16, 16, 128, true, MaskKind::kSoft, 1.0},
                        Case{4, 1100, 32, 8, 128, false, MaskKind::kEvicted, 1.0, 3},
                        Case{1, 8000, 8, 8, 128, false, MaskKind::kNone, 2.0},
                        Case{8, 2000, 12, 4, 64, true, MaskKind::kHard, 1.0}};
  for (const Case& c : cases) {
    SCOPED_TRACE(name_of(c));
    const size_t nq = static_cast<size_t>(c.B) * c.T * c.H * c.D;
    const size_t nk = static_cast<size_t>(c.B) * c.T * c.Hkv * c.D;
    const size_t nm = static_cast<size_t>(c.B) * c.T * c.Hkv;
    const size_t nl = static_cast<size_t>(c.B) * c.H * c.T;
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.D));
    auto u = randu(nm, 0.0, 1.0);
    std::vector<float> mask(nm);
    for (size_t i = 0; i < nm; ++i)
      mask[i] = c.mask == MaskKind::kSoft    ? std::log1p(-0.999 * u[i])
                : c.mask == MaskKind::kHard  ? (u[i] < 0.3 ? -50000.f : 0.f)
                                             : (u[i] < 0.6 ? -INFINITY : 0.f);
    auto qd = randn(nq, c.q_scale), kd = randn(nk), vd = randn(nk), god = randn(nq);
    DevBuf<bf16> q(to_bf16(qd)), k(to_bf16(kd)), v(to_bf16(vd)), gout(to_bf16(god));
    DevBuf<float> dmask(mask);
    const float* mptr = c.mask == MaskKind::kNone ? nullptr : dmask.ptr;
    struct Outputs {
      std::vector<bf16> out, dq, dk, dv;
      std::vector<float> lse, dmask;
    };
    std::vector<Outputs> runs;
    for (auto kernel : {C::AttentionKernel::kSm90, C::AttentionKernel::kSm90Persistent}) {
      DevBuf<bf16> out(nq), gq(nq), gk(nk), gv(nk);
      DevBuf<float> lse(nl), gm(nm);
      for (auto* buf : {&out, &gq, &gk, &gv}) buf->poison();
      lse.poison();
      gm.poison();
      C::dmc_attention_forward(out, lse, q, k, v, mptr, c.B, c.T, c.H, c.Hkv, c.D, c.exclude_ctrl,
                               scale, nullptr, c.window, kernel);
      C::dmc_attention_backward(gq, gk, gv, mptr ? gm.ptr : nullptr, gout, q, k, v, mptr, out, lse,
                                c.B, c.T, c.H, c.Hkv, c.D, c.exclude_ctrl, scale,
                                /*accumulate=*/false, nullptr, c.window, kernel);
      runs.push_back({out.download(), gq.download(), gk.download(), gv.download(),
                      lse.download(), mptr ? gm.download() : std::vector<float>()});
    }
    const Outputs &grid = runs[0], &persistent = runs[1];
    EXPECT_EQ(0, std::memcmp(grid.out.data(), persistent.out.data(), nq * sizeof(bf16)));
    EXPECT_EQ(0, std::memcmp(grid.lse.data(), persistent.lse.data(), nl * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(grid.dk.data(), persistent.dk.data(), nk * sizeof(bf16)));
    EXPECT_EQ(0, std::memcmp(grid.dv.data(), persistent.dv.data(), nk * sizeof(bf16)));
    if (mptr) {
      EXPECT_EQ(0, std::memcmp(grid.dmask.data(), persistent.dmask.data(), nm * sizeof(float)));
    }
    std::vector<double> dq_grid(nq);
    for (size_t i = 0; i < nq; ++i) dq_grid[i] = __bfloat162float(grid.dq[i]);
    // the order of fp32 additions rarely moves a bf16 rounding: a lost or doubled tile is far above
    expect_close("attn bwd dq persistent vs grid", persistent.dq, dq_grid, 1e-3);
  }
}

}  // namespace
}  // namespace dmc::cuda_test
