// GPU vs CPU reference: embedding, RMSNorm, RoPE, SwiGLU, cross-entropy, matmul, the multi-tensor
// AdamW and sum of squares (the DMC scan is in test_cuda_dmc.cpp). Forward and backward, odd
// shapes, fresh random inputs, poisoned outputs; gradients, weight gradients included, both added
// onto random values (+=) and written (=) into NaN.
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/cross_entropy.h"
#include "kernels/embedding.h"
#include "kernels/grad_norm.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "tests/cuda/cuda_test_util.h"

namespace dmc::cuda_test {
namespace {
namespace K = dmc::kernels;
namespace C = dmc::cuda;

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

TEST_F(CudaOps, Embedding) {
  for (int C_ : {200, 256}) {
    const int N = 301, V = 97;
    std::vector<int32_t> tok(N);
    std::uniform_int_distribution<int> d(0, V - 1);
    for (auto& t : tok) t = d(rng());
    tok[5] = tok[6] = tok[100] = 3;  // repeated tokens
    auto wte = randn(static_cast<size_t>(V) * C_);
    auto wte_b = to_bf16(wte);
    DevBuf<int32_t> dtok(tok);
    DevBuf<bf16> dwte(wte_b), dout(static_cast<size_t>(N) * C_);
    dout.poison();
    C::embedding_forward(dout, dtok, dwte, N, C_);
    std::vector<double> ref(static_cast<size_t>(N) * C_);
    K::embedding_forward<double>(ref.data(), tok.data(), wte.data(), N, C_);
    expect_close(C_ == 200 ? "embedding fwd C200" : "embedding fwd C256", dout.download(), ref, 0.0);

    auto g = randn(static_cast<size_t>(N) * C_);
    auto g_b = to_bf16(g);
    auto acc = randn(static_cast<size_t>(V) * C_);
    auto acc_f = to_f32(acc);
    DevBuf<bf16> dg(g_b);
    DevBuf<float> dacc(acc_f);
    C::embedding_backward(dacc, dg, dtok, N, C_);
    K::embedding_backward<double>(acc.data(), g.data(), tok.data(), N, C_);
    expect_close("embedding bwd (dwte +=)", dacc.download(), acc, kF32Tol);
  }
}

// One RMSNorm forward and backward against the reference; `shift` elements past 16-byte aligned
// starts for the row buffers (1: the scalar path however wide the rows).
void check_rmsnorm(int N, int C_, int shift) {
  const std::string shape = "N" + std::to_string(N) + " C" + std::to_string(C_) +
                            (shift ? " unaligned" : "");
  const size_t n = static_cast<size_t>(N) * C_;
  auto x = randn(n, 2.0, 0.3), w = randn(C_, 0.5, 1.0);
  auto xb = to_bf16(x), wb = to_bf16(w);
  xb.insert(xb.begin(), shift, bf16());
  DevBuf<bf16> dx(xb), dw(wb), dout(n + shift);
  DevBuf<float> drstd(N);
  dout.poison();
  drstd.poison();
  C::rmsnorm_forward(dout + shift, drstd, dx + shift, dw, N, C_, 1e-5f);
  std::vector<double> ref(n), rstd(N);
  K::rmsnorm_forward<double>(ref.data(), rstd.data(), x.data(), w.data(), N, C_, 1e-5f);
  std::vector<bf16> out = dout.download();
  out.erase(out.begin(), out.begin() + shift);
  expect_close(("rmsnorm fwd out " + shape).c_str(), out, ref, kBf16Tol);
  expect_close(("rmsnorm fwd rstd " + shape).c_str(), drstd.download(), rstd, kF32Tol);

  // One gradient and one set of starting values for every call below.
  auto g = randn(n), dinp_start = randn(n), dw_start = randn(C_);
  auto gb = to_bf16(g), dinp_startb = to_bf16(dinp_start);
  auto dw_startf = to_f32(dw_start);
  gb.insert(gb.begin(), shift, bf16());
  dinp_startb.insert(dinp_startb.begin(), shift, bf16());
  DevBuf<bf16> dg(gb), ddinp(n + shift);
  DevBuf<float> ddw(C_);
  // Each of dinp and dweight absent, written into NaN or added onto random values, in any pairing
  // (a training step adds dinp into the residual stream's gradient and may write dweight).
  enum Grad { kAbsent, kWrite, kAdd };
  const char* const kSymbol[] = {"-", "=", "+="};
  for (Grad to_dinp : {kAbsent, kWrite, kAdd}) {
    for (Grad to_dw : {kAbsent, kWrite, kAdd}) {
      if (to_dinp == kAbsent && to_dw == kAbsent) continue;
      const std::string call = shape + " (dinp " + kSymbol[to_dinp] + " ; dweight " +
                               kSymbol[to_dw] + ")";
      std::vector<double> dinp = to_dinp == kAdd ? dinp_start : std::vector<double>(n, NAN);
      std::vector<double> dwt = to_dw == kAdd ? dw_start : std::vector<double>(C_, NAN);
      if (to_dinp == kAdd) ddinp.upload(dinp_startb);
      else ddinp.poison();
      if (to_dw == kAdd) ddw.upload(dw_startf);
      else ddw.poison();
      C::rmsnorm_backward(to_dinp ? ddinp + shift : nullptr, to_dw ? ddw.ptr : nullptr, dg + shift,
                          dx + shift, dw, drstd, N, C_, to_dinp == kAdd, to_dw == kAdd);
      // The reference, one gradient at a time: it has one `accumulate` for both.
      if (to_dinp)
        K::rmsnorm_backward<double>(dinp.data(), nullptr, g.data(), x.data(), w.data(),
                                    rstd.data(), N, C_, to_dinp == kAdd);
      if (to_dw)
        K::rmsnorm_backward<double>(nullptr, dwt.data(), g.data(), x.data(), w.data(),
                                    rstd.data(), N, C_, to_dw == kAdd);
      if (to_dinp) {
        std::vector<bf16> dinp_out = ddinp.download();
        dinp_out.erase(dinp_out.begin(), dinp_out.begin() + shift);
        expect_close("rmsnorm bwd dinp " + call, dinp_out, dinp, kBf16Tol);
      }
      if (!to_dw) continue;
      const std::vector<float> dw_out = ddw.download();
      expect_close("rmsnorm bwd dweight " + call, dw_out, dwt, 1e-4);
      if (to_dinp == kWrite && to_dw == kWrite) {  // the same call again: bit-identical
        C::rmsnorm_backward(ddinp + shift, ddw, dg + shift, dx + shift, dw, drstd, N, C_, false,
                            false);
        EXPECT_EQ(std::memcmp(ddw.download().data(), dw_out.data(), sizeof(float) * C_), 0)
            << "rmsnorm bwd dweight rerun " << shape;
      }
    }
  }
}

TEST_F(CudaOps, RmsNorm) {
  // N up to 130: a block per row (a decode step); 2100 and 8195: a warp per row up to 2048
  // channels (a prefill, a training batch), a block beyond. The backward sums dweight over
  // chunks of ceil(N / 256) rows: one row up to 256 rows, 9 at 2100 and 33 at 8195, the last
  // chunk shorter (3 and 11 rows; at 2100 one warp of its block has none).
  // C: head dims to Llama widths, 1000 a partial 16-byte word per thread, 100, 1001 and 8200
  // (past the register-resident rows) the scalar path.
  for (int N : {1, 7, 67, 130, 2100})
    for (int C_ : {64, 96, 100, 1000, 1001, 2048, 4096, 8192, 8200}) check_rmsnorm(N, C_, 0);
  for (int C_ : {64, 100, 2048, 4096}) check_rmsnorm(8195, C_, 0);
  for (int N : {67, 2100}) check_rmsnorm(N, 2048, 1);
}

// One RoPE forward and backward against the reference, buffers `shift` elements past 16-byte
// aligned starts (1: the scalar path).
void check_rope(int B, int T, int H, int D, bool keep, int shift) {
  const std::string shape = "B" + std::to_string(B) + " T" + std::to_string(T) + " H" +
                            std::to_string(H) + " D" + std::to_string(D) +
                            (keep ? " keep_last" : "") + (shift ? " unaligned" : "");
  const int pos0 = 5;
  const size_t n = static_cast<size_t>(B) * T * H * D;
  auto x = randn(n);
  auto xb = to_bf16(x);
  xb.insert(xb.begin(), shift, bf16());
  DevBuf<bf16> dx(xb), dout(n + shift);
  dout.poison();
  C::rope_forward(dout + shift, dx + shift, B, T, H, D, pos0, 10000.f, keep);
  std::vector<double> ref(n);
  K::rope_forward<double>(ref.data(), x.data(), B, T, H, D, pos0, 10000.f, keep);
  std::vector<bf16> out = dout.download();
  out.erase(out.begin(), out.begin() + shift);
  expect_close(("rope fwd " + shape).c_str(), out, ref, kBf16Tol);

  for (bool accumulate : {true, false}) {
    auto g = randn(n), acc = grad_start(n, accumulate);
    auto gb = to_bf16(g), accb = to_bf16(acc);
    gb.insert(gb.begin(), shift, bf16());
    accb.insert(accb.begin(), shift, bf16());
    DevBuf<bf16> dg(gb), dacc(accb);
    C::rope_backward(dacc + shift, dg + shift, B, T, H, D, pos0, 10000.f, keep, accumulate);
    K::rope_backward<double>(acc.data(), g.data(), B, T, H, D, pos0, 10000.f, keep, accumulate);
    std::vector<bf16> dacc_out = dacc.download();
    dacc_out.erase(dacc_out.begin(), dacc_out.begin() + shift);
    expect_close(with_mode("rope bwd " + shape, accumulate), dacc_out, acc, kBf16Tol);
  }
}

TEST_F(CudaOps, Rope) {
  // T 37: a thread per head (few tokens, as a decode step's); 1100: 2 heads a thread on the
  // scalar path. D 64, 80, 128: 16-byte words (80: an odd count of them a half); 72: scalar.
  for (int T : {37, 1100})
    for (bool keep : {false, true})
      for (int D : {64, 72, 80, 128}) check_rope(2, T, 3, D, keep, 0);
  // Many tokens: a thread's heads in groups of 4 and a partial last group (7 heads, 4 a thread).
  check_rope(2, 4100, 7, 128, true, 0);
  check_rope(2, 1100, 3, 128, true, 1);
  // in place forward (out aliases inp)
  const int B = 1, T = 9, H = 2, D = 64;
  const size_t n = static_cast<size_t>(B) * T * H * D;
  auto x = randn(n);
  auto xb = to_bf16(x);
  DevBuf<bf16> dx(xb);
  C::rope_forward(dx, dx, B, T, H, D, 0, 500000.f, true);
  std::vector<double> ref(n);
  K::rope_forward<double>(ref.data(), x.data(), B, T, H, D, 0, 500000.f, true);
  expect_close("rope fwd in place", dx.download(), ref, kBf16Tol);
}

// Separate gate and up arrays (one row; scalar and 16-byte vector paths), and the fused
// projection's output [rows, 2F] read in place (F a multiple of 8: vectors; else scalar).
TEST_F(CudaOps, SwiGlu) {
  struct Layout {
    size_t rows, F;
    bool fused;
  };
  for (const Layout& c : {Layout{1, 100003, false}, Layout{1, 100000, false},
                          Layout{37, 5632 / 4, true}, Layout{37, 1003, true}}) {
    const size_t n = c.rows * c.F, ld = c.fused ? 2 * c.F : c.F, up_at = c.fused ? c.F : n;
    // gate then up in one buffer: at [0, n) and [n, 2n) when separate, interleaved by rows fused
    auto gu = randn(2 * n, 2.0);
    auto gub = to_bf16(gu);
    DevBuf<bf16> dgu(gub), dout(n);
    dout.poison();
    const std::string name = "swiglu rows " + std::to_string(c.rows) + " F " +
                             std::to_string(c.F) + (c.fused ? " fused" : "");
    C::swiglu_forward(dout, dgu, dgu.ptr + up_at, c.rows, c.F, ld);
    std::vector<double> ref(n);
    K::swiglu_forward<double>(ref.data(), gu.data(), gu.data() + up_at, c.rows, c.F, ld);
    expect_close((name + " fwd").c_str(), dout.download(), ref, kBf16Tol);

    for (bool accumulate : {true, false}) {
      auto g = randn(n), dgate_up = grad_start(2 * n, accumulate);
      auto gb = to_bf16(g), dgate_upb = to_bf16(dgate_up);
      DevBuf<bf16> dgo(gb), ddgu(dgate_upb);
      C::swiglu_backward(ddgu, ddgu.ptr + up_at, dgo, dgu, dgu.ptr + up_at, c.rows, c.F, ld,
                         accumulate);
      K::swiglu_backward<double>(dgate_up.data(), dgate_up.data() + up_at, g.data(), gu.data(),
                                 gu.data() + up_at, c.rows, c.F, ld, accumulate);
      expect_close(with_mode(name + " bwd dgate, dup", accumulate), ddgu.download(), dgate_up,
                   kBf16Tol);
    }
  }
}

TEST_F(CudaOps, CrossEntropy) {
  for (int V : {32003, 32000}) {  // scalar and 16-byte vector paths
  const int N = 45;
  const size_t n = static_cast<size_t>(N) * V;
  auto logits = randn(n, 3.0);
  auto lb = to_bf16(logits);
  std::vector<int32_t> tgt(N);
  std::uniform_int_distribution<int> d(0, V - 1);
  for (auto& t : tgt) t = d(rng());
  tgt[3] = -1;  // unlabelled position
  tgt[7] = V - 1;
  DevBuf<bf16> dl(lb);
  DevBuf<int32_t> dt(tgt);
  DevBuf<float> dloss(N);
  dloss.poison();
  C::cross_entropy_forward(dloss, dl, dt, N, V);
  std::vector<double> ref(N);
  K::cross_entropy_forward<double>(ref.data(), logits.data(), tgt.data(), N, V);
  expect_close("cross_entropy fwd losses", dloss.download(), ref, 1e-5);

  // Written (=), the unlabelled row must come out as zeros.
  for (bool accumulate : {true, false}) {
    auto dls = randu(N, 0.1, 1.0), acc = grad_start(n, accumulate, 1e-4);
    auto dlsf = to_f32(dls);
    auto accb = to_bf16(acc);
    DevBuf<float> ddls(dlsf);
    DevBuf<bf16> dacc(accb);
    C::cross_entropy_backward(dacc, dl, dt, ddls, N, V, accumulate);
    K::cross_entropy_backward<double>(acc.data(), logits.data(), tgt.data(), dls.data(), N, V,
                                      accumulate);
    expect_close(with_mode("cross_entropy bwd dlogits", accumulate),
                 dacc.download(), acc, kBf16Tol);
  }
  }
}

TEST_F(CudaOps, Matmul) {
  for (auto [N, IC, OC] : {std::tuple{67, 96, 130}, std::tuple{256, 512, 384}}) {
    auto x = randn(static_cast<size_t>(N) * IC), w = randn(static_cast<size_t>(OC) * IC, 0.05);
    auto xb = to_bf16(x), wb = to_bf16(w);
    DevBuf<bf16> dx(xb), dw(wb), dout(static_cast<size_t>(N) * OC);
    dout.poison();
    C::matmul_forward(dout, dx, dw, N, IC, OC);
    std::vector<double> ref(static_cast<size_t>(N) * OC);
    K::matmul_forward<double>(ref.data(), x.data(), w.data(), N, IC, OC);
    expect_close("matmul fwd", dout.download(), ref, kBf16Tol);

    // Written (=): cuBLAS with beta 0 must not read dinp or dweight, whose NaN would show.
    for (bool accumulate : {true, false}) {
      auto g = randn(static_cast<size_t>(N) * OC),
           dinp = grad_start(static_cast<size_t>(N) * IC, accumulate),
           dwt = grad_start(static_cast<size_t>(OC) * IC, accumulate);
      auto gb = to_bf16(g), dinpb = to_bf16(dinp);
      auto dwtf = to_f32(dwt);
      DevBuf<bf16> dg(gb), ddinp(dinpb);
      DevBuf<float> ddw(dwtf);
      C::matmul_backward(ddinp, ddw, dg, dx, dw, N, IC, OC, accumulate);
      K::matmul_backward<double>(dinp.data(), dwt.data(), g.data(), x.data(), w.data(), N, IC, OC,
                                 accumulate);
      expect_close(with_mode("matmul bwd dinp", accumulate), ddinp.download(), dinp, kBf16Tol);
      expect_close(with_mode("matmul bwd dweight fp32", accumulate), ddw.download(), dwt, 1e-5);
    }
  }
  // No rows: a written weight gradient is zeros (empty sums), an added one is left as it was.
  for (bool accumulate : {true, false}) {
    const int IC = 96, OC = 130;
    auto dwt = grad_start(static_cast<size_t>(OC) * IC, accumulate),
         dnt = grad_start(IC, accumulate);
    auto dwtf = to_f32(dwt), dntf = to_f32(dnt);
    DevBuf<float> ddw(dwtf), ddn(dntf);
    DevBuf<bf16> dummy(static_cast<size_t>(OC) * IC);
    C::matmul_backward(nullptr, ddw, dummy, dummy, dummy, 0, IC, OC, accumulate);
    C::rmsnorm_backward(nullptr, ddn, dummy, dummy, dummy, nullptr, 0, IC, accumulate,
                        accumulate);
    if (!accumulate) {
      std::fill(dwt.begin(), dwt.end(), 0.0);
      std::fill(dnt.begin(), dnt.end(), 0.0);
    }
    expect_close(with_mode("matmul bwd dweight of no rows", accumulate), ddw.download(), dwt, 0.0);
    expect_close(with_mode("rmsnorm bwd dweight of no rows", accumulate), ddn.download(), dnt, 0.0);
  }
}

// The forwards of a few rows (a decode step's batch: the weight-streaming kernel at N ≤ 2 when
// IC is a multiple of 8, cuBLAS past it or otherwise) in their three forms: bf16 out, out += (the
// engine's residual add) and fp32 out (the LM head), against the reference on the same
// bf16-rounded operands. Row lengths of one vector per lane or less (136), of several vectors per
// lane with a remainder (4104), of no 16-byte multiple (100); column counts that leave a block
// part empty (33).
TEST_F(CudaOps, MatmulFewRows) {
  for (int N : {1, 2, 3, 4, 5, 8})
    for (int IC : {136, 4104, 100})
      for (int OC : {33, 384}) {
        const std::string shape = " N" + std::to_string(N) + " IC" + std::to_string(IC) + " OC" +
                                  std::to_string(OC);
        const size_t n = static_cast<size_t>(N) * OC;
        auto x = randn(static_cast<size_t>(N) * IC),
             w = randn(static_cast<size_t>(OC) * IC, 1.0 / std::sqrt(IC)), r = randn(n);
        auto xb = to_bf16(x), wb = to_bf16(w), rb = to_bf16(r);  // x, w, r rounded alike
        DevBuf<bf16> dx(xb), dw(wb), dout(n), dadd(rb);
        DevBuf<float> dlogits(n);
        std::vector<double> ref(n), ref_add(n);
        K::matmul_forward<double>(ref.data(), x.data(), w.data(), N, IC, OC);
        K::matmul_forward_residual<double>(ref_add.data(), x.data(), w.data(), r.data(), N, IC,
                                           OC);
        dout.poison();
        dlogits.poison();
        C::matmul_forward(dout, dx, dw, N, IC, OC);
        C::matmul_forward_add(dadd, dx, dw, N, IC, OC);
        C::matmul_forward_f32(dlogits, dx, dw, N, IC, OC);
        expect_close("matmul fwd" + shape, dout.download(), ref, kBf16Tol);
        expect_close("matmul fwd +=" + shape, dadd.download(), ref_add, kBf16Tol);
        expect_close("matmul fwd fp32 out" + shape, dlogits.download(), ref, 1e-5);
      }
}

// The projection onto the residual stream, out = residual + inp · weight^T, into NaN, every buffer `shift` elements past its allocation's start (1: 2-byte aligned,
// which the algorithm must be picked for). Beside the relative error, the share of outputs that
// differ from the correctly rounded reference tells one rounding from two: with the product and
// the residual of one size (weights of standard deviation 1/sqrt(IC)), rounding the product to
// bf16 before the add moves about 30% of the outputs by an ulp; with one rounding only the fp32
// accumulation's error can, where the exact sum lies next to a rounding boundary (a few tenths of a
// percent). Checked where there are 10^4 outputs or more: in fewer, a few such ties would decide.
void check_matmul_residual(int N, int IC, int OC, int shift = 0) {
  const std::string shape = "matmul fwd + residual N" + std::to_string(N) + " IC" +
                            std::to_string(IC) + " OC" + std::to_string(OC) +
                            (shift ? " unaligned" : "");
  const size_t n = static_cast<size_t>(N) * OC;
  auto x = randn(static_cast<size_t>(N) * IC), r = randn(n),
       w = randn(static_cast<size_t>(OC) * IC, 1.0 / std::sqrt(std::max(IC, 1)));
  auto xb = to_bf16(x), rb = to_bf16(r), wb = to_bf16(w);
  for (auto* v : {&xb, &rb, &wb}) v->insert(v->begin(), shift, bf16());
  DevBuf<bf16> dx(xb), dw(wb), dr(rb), dout(n + shift);
  dout.poison();
  C::matmul_forward_residual(dout + shift, dx + shift, dw + shift, dr + shift, N, IC, OC);
  std::vector<double> ref(n);
  K::matmul_forward_residual<double>(ref.data(), x.data(), w.data(), r.data(), N, IC, OC);
  std::vector<bf16> got = dout.download();
  got.erase(got.begin(), got.begin() + shift);
  expect_close(shape, got, ref, kBf16Tol);
  if (n < 10000) return;
  size_t off = 0;
  for (size_t i = 0; i < n; ++i) {
    const bf16 rounded = __float2bfloat16(static_cast<float>(ref[i]));
    off += __bfloat162float(got[i]) != __bfloat162float(rounded);
  }
  const double share = static_cast<double>(off) / n;
  std::printf("[ error ] %-48s %.2f%% off the rounded reference\n", shape.c_str(), 100 * share);
  EXPECT_LE(share, 0.05) << shape << ": the sum is rounded more than once";
}

TEST_F(CudaOps, MatmulResidual) {
  // Odd row counts; rows of no 16-byte multiple (100, 37, 33); the 1.36B model's o_proj
  // (2048 → 2048 over its 8192 rows) and down_proj (5632 → 2048); an empty product (IC 0: out
  // is the residual).
  for (int N : {1, 7, 130})
    for (int IC : {64, 2048, 100, 37})
      for (int OC : {48, 6144, 33}) check_matmul_residual(N, IC, OC);
  check_matmul_residual(8192, 2048, 2048);
  check_matmul_residual(130, 5632, 2048);
  check_matmul_residual(130, 2048, 2048, 1);
  check_matmul_residual(7, 0, 48);
  // In place (out == residual) is refused before anything runs: cuBLASLt's C == D GEMM rounded
  // about 29% of its outputs twice on an H100.
  auto xs = randn(130 * 64), ws = randn(64 * 48), rs = randn(130 * 48);
  DevBuf<bf16> x(to_bf16(xs)), w(to_bf16(ws)), r(to_bf16(rs));
  EXPECT_DEATH(C::matmul_forward_residual(r, x, w, r, 130, 64, 48),
               "matmul_forward_residual: out must not be the residual");
}

// The multi-tensor optimizer on a layout with odd sizes and offsets (the scalar path), aligned
// ones (the vector path), a tensor of several chunks, mixed decay and sharding, and a gap no tensor
// covers; the reference is the per-tensor loop of trainer::AdamW::Step on kernels::adamw_update
// and kernels::sum_of_squares. max_norm: clipping active (0.5, under the norm), inactive (1e9)
// and disabled (0).
TEST_F(CudaOps, MultiTensorAdamWMatchesPerTensorCpu) {
  const std::vector<C::FlatTensor> tensors = {
      {0, 1, false, false},        {1, 3, true, false},         {4, 4096, true, true},
      {4100, 77777, true, false},  {81877, 5, false, true},     {81892, 65540, false, false},
      {147432, 1001, true, true}};  // 81882..81891: a gap
  const size_t n = 148433;
  const double rep_weight = 0.5;  // as for TP size 2
  for (const float max_norm : {0.5f, 1e9f, 0.0f}) {
    std::vector<float> p(n), g(n), m(n), v(n);
    auto pd = randn(n), gd = randn(n, 0.01), md = randn(n, 0.01), vd = randu(n, 0.0, 1e-3);
    for (size_t i = 0; i < n; ++i) {
      p[i] = static_cast<float>(pd[i]);
      g[i] = static_cast<float>(gd[i]);
      m[i] = static_cast<float>(md[i]);
      v[i] = static_cast<float>(vd[i]);
    }
    K::AdamWHyper hy;
    hy.lr = 1e-3f;
    hy.weight_decay = 0.1f;
    hy.step = 7;
    const std::vector<float> p0 = p;
    DevBuf<float> dp(p), dg(g), dm(m), dv(v);
    DevBuf<bf16> dpb(n);
    dpb.poison();
    std::vector<double> nan = {NAN};
    DevBuf<double> dss(nan);
    const C::AdamWStepArgs args = C::adamw_step_args(hy, max_norm);
    DevBuf<C::AdamWStepArgs> dargs(std::vector<C::AdamWStepArgs>{args});
    C::MultiTensorLayout layout(tensors);
    C::multi_tensor_sum_of_squares(dss, dg, layout, rep_weight);
    C::multi_tensor_adamw(dp, dg, dm, dv, dpb, layout, dargs, dss);

    double rep = 0, shard = 0;
    for (const auto& t : tensors)
      (t.sharded ? shard : rep) += K::sum_of_squares(g.data() + t.offset, t.size);
    const double ss = rep_weight * rep + shard, norm = std::sqrt(ss);
    const float gs = max_norm > 0 && norm > max_norm ? static_cast<float>(max_norm / norm) : 1.0f;
    if (max_norm == 0.5f) {
      EXPECT_LT(gs, 1.0f) << "clipping should be active";
    }
    for (const auto& t : tensors) {
      K::AdamWHyper th = hy;
      th.weight_decay = t.decay ? hy.weight_decay : 0.0f;
      K::adamw_update(p.data() + t.offset, g.data() + t.offset, m.data() + t.offset,
                      v.data() + t.offset, t.size, th, gs);
    }
    const std::string tag = " (max_norm " + std::to_string(max_norm) + ")";
    expect_close(("multi-tensor sum of squares" + tag).c_str(), dss.download(),
                 std::vector<double>{ss}, 1e-12);
    const std::vector<float> pg = dp.download();
    expect_close(("multi-tensor adamw param" + tag).c_str(), pg, as_double(p), 1e-6);
    expect_close(("multi-tensor adamw m" + tag).c_str(), dm.download(), as_double(m), 1e-6);
    expect_close(("multi-tensor adamw v" + tag).c_str(), dv.download(), as_double(v), 1e-6);
    // The bf16 copy of every covered element; the gap keeps its poison, its master its value.
    const std::vector<bf16> pb = dpb.download();
    std::vector<double> pb_in, p_in;
    for (const auto& t : tensors)
      for (size_t i = t.offset; i < t.offset + t.size; ++i) {
        pb_in.push_back(__bfloat162float(pb[i]));
        p_in.push_back(p[i]);
      }
    expect_close(("multi-tensor adamw bf16 copy" + tag).c_str(), pb_in, p_in, kBf16Tol);
    for (size_t i = 81882; i < 81892; ++i) {
      EXPECT_TRUE(std::isnan(__bfloat162float(pb[i]))) << i;
      EXPECT_EQ(pg[i], p0[i]) << i;
    }
  }
}

}  // namespace
}  // namespace dmc::cuda_test
