// CPU reference kernels, the plain-transformer ops: finite-difference gradient checks in double on
// tiny odd shapes, plus semantic checks against direct formulas. Every gradient check starts the
// gradient buffers from random values (AccumulatedGrad), so it also verifies the += convention;
// expect_written_equals_added checks the written (accumulate false) mode of the gradients, weight
// gradients included.
#include <cmath>
#include <cstdint>
#include <random>
#include <tuple>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/cross_entropy.h"
#include "kernels/embedding.h"
#include "kernels/grad_norm.h"
#include "kernels/matmul.h"
#include "kernels/noise.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "tests/gradcheck.h"

namespace dmc {
namespace {

using namespace kernels;
using testing::AccumulatedGrad;
using testing::dot;
using testing::expect_all_near;
using testing::expect_gradient_matches;
using testing::random_vector;
using Vec = std::vector<double>;

// ---------------------------------------------------------------------------------------------
// matmul

Vec naive_matmul(const Vec& inp, const Vec& w, int N, int IC, int OC) {
  Vec out(static_cast<size_t>(N) * OC, 0.0);
  for (int n = 0; n < N; ++n)
    for (int o = 0; o < OC; ++o)
      for (int i = 0; i < IC; ++i) out[n * OC + o] += inp[n * IC + i] * w[o * IC + i];
  return out;
}

TEST(KernelsBasic, MatmulGradients) {
  std::mt19937_64 rng(1);
  // IC = 11 exercises both the 8-lane main loop and the tail; N = 5 a partial block of rows.
  const int N = 5, IC = 11, OC = 3;
  Vec inp = random_vector(N * IC, rng), w = random_vector(OC * IC, rng);
  const Vec wo = random_vector(N * OC, rng);
  auto loss = [&] {
    Vec out(N * OC);
    matmul_forward(out.data(), inp.data(), w.data(), N, IC, OC);
    return dot(wo, out);
  };
  AccumulatedGrad dinp(inp.size(), rng), dw(w.size(), rng);
  matmul_backward(dinp.data(), dw.data(), wo.data(), inp.data(), w.data(), N, IC, OC,
                  /*accumulate=*/true);
  expect_gradient_matches(loss, inp, dinp.delta(), "matmul dinp");
  expect_gradient_matches(loss, w, dw.delta(), "matmul dweight");

  // Either output may be null, and each alone gives the same as both together.
  AccumulatedGrad only_dinp(inp.size(), rng), only_dw(w.size(), rng);
  matmul_backward(only_dinp.data(), static_cast<double*>(nullptr), wo.data(), inp.data(), w.data(),
                  N, IC, OC, /*accumulate=*/true);
  matmul_backward(static_cast<double*>(nullptr), only_dw.data(), wo.data(), inp.data(), w.data(), N,
                  IC, OC, /*accumulate=*/true);
  expect_all_near(only_dinp.delta(), dinp.delta(), 1e-12, "matmul dinp alone");
  expect_all_near(only_dw.delta(), dw.delta(), 1e-12, "matmul dweight alone");

  // Without accumulate both are written.
  testing::expect_written_equals_added(
      {inp.size(), w.size()}, rng,
      [&](double* const* out, bool accumulate) {
        matmul_backward(out[0], out[1], wo.data(), inp.data(), w.data(), N, IC, OC, accumulate);
      },
      "matmul dinp and dweight written");
  // An empty batch writes zeros.
  Vec empty_dw(w.size(), std::nan(""));
  matmul_backward(static_cast<double*>(nullptr), empty_dw.data(), wo.data(), inp.data(), w.data(),
                  0, IC, OC, /*accumulate=*/false);
  expect_all_near(empty_dw, Vec(w.size(), 0.0), 0.0, "matmul dweight of no rows");
}

TEST(KernelsBasic, MatmulMatchesNaiveOnLargerShapes) {
  std::mt19937_64 rng(2);
  // The third shape is large enough to take the multi-threaded path when OpenMP is on.
  for (auto [N, IC, OC] : {std::tuple{7, 3, 5}, std::tuple{37, 70, 29}, std::tuple{66, 72, 65}}) {
    const Vec inp = random_vector(N * IC, rng), w = random_vector(OC * IC, rng);
    const Vec dout = random_vector(N * OC, rng);
    const Vec ref = naive_matmul(inp, w, N, IC, OC);
    Vec out(N * OC);
    matmul_forward(out.data(), inp.data(), w.data(), N, IC, OC);
    expect_all_near(out, ref, 1e-12, "matmul forward (double)");

    // float in, double accumulation: only the final rounding differs
    std::vector<float> inpf(inp.begin(), inp.end()), wf(w.begin(), w.end()), outf(N * OC);
    matmul_forward(outf.data(), inpf.data(), wf.data(), N, IC, OC);
    const Vec reff =
        naive_matmul(Vec(inpf.begin(), inpf.end()), Vec(wf.begin(), wf.end()), N, IC, OC);
    expect_all_near(outf, reff, 1e-6, "matmul forward (float)");

    // backward against the transposed products
    Vec dinp(N * IC, 0.0), dw(OC * IC, 0.0);
    matmul_backward(dinp.data(), dw.data(), dout.data(), inp.data(), w.data(), N, IC, OC,
                    /*accumulate=*/false);
    Vec rdinp(N * IC, 0.0), rdw(OC * IC, 0.0);
    for (int n = 0; n < N; ++n)
      for (int o = 0; o < OC; ++o)
        for (int i = 0; i < IC; ++i) {
          rdinp[n * IC + i] += dout[n * OC + o] * w[o * IC + i];
          rdw[o * IC + i] += dout[n * OC + o] * inp[n * IC + i];
        }
    expect_all_near(dinp, rdinp, 1e-12, "matmul dinp");
    expect_all_near(dw, rdw, 1e-12, "matmul dweight");
  }
}

// The residual joins the product's sum before its one rounding: out = residual + inp · w^T, also
// with an empty product (IC 0).
TEST(KernelsBasic, MatmulResidualRoundsTheSumOnce) {
  std::mt19937_64 rng(4);
  for (auto [N, IC, OC] : {std::tuple{7, 3, 5}, std::tuple{66, 72, 65}, std::tuple{5, 0, 4}}) {
    const Vec inp = random_vector(N * IC, rng), w = random_vector(OC * IC, rng);
    const Vec r = random_vector(N * OC, rng);
    Vec ref = naive_matmul(inp, w, N, IC, OC);
    for (size_t i = 0; i < ref.size(); ++i) ref[i] += r[i];
    Vec out(N * OC);
    matmul_forward_residual(out.data(), inp.data(), w.data(), r.data(), N, IC, OC);
    expect_all_near(out, ref, 1e-12, "matmul forward + residual (double)");

    // float: the double sum rounded once, bit for bit (the kernel's summation order moves the
    // double sum by ~1e-16, far under a float ulp); rounding the product first would not be.
    std::vector<float> inpf(inp.begin(), inp.end()), wf(w.begin(), w.end());
    std::vector<float> rf(r.begin(), r.end()), outf(N * OC);
    matmul_forward_residual(outf.data(), inpf.data(), wf.data(), rf.data(), N, IC, OC);
    const Vec prod =
        naive_matmul(Vec(inpf.begin(), inpf.end()), Vec(wf.begin(), wf.end()), N, IC, OC);
    std::vector<float> once(N * OC);
    for (size_t i = 0; i < once.size(); ++i) once[i] = static_cast<float>(prod[i] + rf[i]);
    expect_all_near(outf, once, 0.0, "matmul forward + residual (float, one rounding)");
  }
}

// ---------------------------------------------------------------------------------------------
// embedding

TEST(KernelsBasic, EmbeddingForwardAndGradient) {
  std::mt19937_64 rng(3);
  const int V = 6, C = 5, N = 7;
  const std::vector<int32_t> tokens = {2, 0, 5, 2, 2, 4, 0};  // repeats must sum
  Vec wte = random_vector(V * C, rng);
  const Vec wo = random_vector(N * C, rng);
  Vec out(N * C);
  embedding_forward(out.data(), tokens.data(), wte.data(), N, C);
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) EXPECT_EQ(out[n * C + c], wte[tokens[n] * C + c]);
  auto loss = [&] {
    Vec o(N * C);
    embedding_forward(o.data(), tokens.data(), wte.data(), N, C);
    return dot(wo, o);
  };
  AccumulatedGrad dwte(wte.size(), rng);
  embedding_backward(dwte.data(), wo.data(), tokens.data(), N, C);
  expect_gradient_matches(loss, wte, dwte.delta(), "embedding dwte");
  // rows of tokens that never occur get nothing
  const Vec d = dwte.delta();
  for (int c = 0; c < C; ++c) {
    EXPECT_EQ(d[1 * C + c], 0.0);
    EXPECT_EQ(d[3 * C + c], 0.0);
  }
}

// Vocabulary-parallel: each shard's rows of the table give the shard's part of the output, the
// sum over shards is the whole lookup, and each shard's gradient is its rows of the whole one.
TEST(KernelsBasic, EmbeddingVocabShardsSumToTheWholeTable) {
  std::mt19937_64 rng(4);
  const int V = 7, C = 3, N = 6;
  const std::vector<int32_t> tokens = {6, 0, 3, 3, 5, 1};
  const Vec wte = random_vector(V * C, rng), dout = random_vector(N * C, rng);
  Vec whole(N * C), whole_grad(V * C, 0.0);
  embedding_forward(whole.data(), tokens.data(), wte.data(), N, C);
  embedding_backward(whole_grad.data(), dout.data(), tokens.data(), N, C);
  Vec summed(N * C, 0.0);
  for (const auto& [begin, rows] : {std::pair{0, 3}, std::pair{3, 2}, std::pair{5, 2}}) {
    Vec part(N * C), grad(rows * C, 0.0);
    embedding_forward(part.data(), tokens.data(), wte.data() + begin * C, N, C, begin, rows);
    for (int n = 0; n < N; ++n) {
      const bool mine = tokens[n] >= begin && tokens[n] < begin + rows;
      for (int c = 0; c < C; ++c) {
        if (!mine) {
          EXPECT_EQ(part[n * C + c], 0.0) << "row of another shard, token " << tokens[n];
        }
        summed[n * C + c] += part[n * C + c];
      }
    }
    embedding_backward(grad.data(), dout.data(), tokens.data(), N, C, begin, rows);
    for (int i = 0; i < rows * C; ++i)
      EXPECT_EQ(grad[i], whole_grad[begin * C + i]) << "shard at " << begin << ", element " << i;
  }
  expect_all_near(summed, whole, 0.0, "sum of the shards' lookups");
}

// ---------------------------------------------------------------------------------------------
// rmsnorm

TEST(KernelsBasic, RmsnormForwardAndGradients) {
  std::mt19937_64 rng(4);
  const int N = 3, C = 7;
  const float eps = 1e-5f;
  Vec inp = random_vector(N * C, rng), w = random_vector(C, rng, 0.5, 1.5);
  const Vec wo = random_vector(N * C, rng);
  Vec out(N * C), rstd(N);
  rmsnorm_forward(out.data(), rstd.data(), inp.data(), w.data(), N, C, eps);
  for (int n = 0; n < N; ++n) {
    double ss = 0;
    for (int c = 0; c < C; ++c) ss += inp[n * C + c] * inp[n * C + c];
    const double r = 1 / std::sqrt(ss / C + eps);
    EXPECT_NEAR(rstd[n], r, 1e-12);
    for (int c = 0; c < C; ++c) EXPECT_NEAR(out[n * C + c], inp[n * C + c] * r * w[c], 1e-12);
  }
  auto loss = [&] {
    Vec o(N * C), r(N);
    rmsnorm_forward(o.data(), r.data(), inp.data(), w.data(), N, C, eps);
    return dot(wo, o);
  };
  AccumulatedGrad dinp(inp.size(), rng), dw(w.size(), rng);
  rmsnorm_backward(dinp.data(), dw.data(), wo.data(), inp.data(), w.data(), rstd.data(), N, C,
                   /*accumulate=*/true);
  expect_gradient_matches(loss, inp, dinp.delta(), "rmsnorm dinp");
  expect_gradient_matches(loss, w, dw.delta(), "rmsnorm dweight");
  testing::expect_written_equals_added(
      {inp.size(), w.size()}, rng,
      [&](double* const* out, bool accumulate) {
        rmsnorm_backward(out[0], out[1], wo.data(), inp.data(), w.data(), rstd.data(), N, C,
                         accumulate);
      },
      "rmsnorm dinp and dweight written");
}

// ---------------------------------------------------------------------------------------------
// rope

constexpr int kRopeB = 2, kRopeT = 3, kRopeH = 2, kRopeD = 8, kRopePos0 = 5;
constexpr float kRopeTheta = 10.f;  // small base: every channel pair turns noticeably

TEST(KernelsBasic, RopeGradients) {
  std::mt19937_64 rng(5);
  const int n = kRopeB * kRopeT * kRopeH * kRopeD;
  for (bool keep : {false, true}) {
    Vec x = random_vector(n, rng);
    const Vec wo = random_vector(n, rng);
    auto loss = [&] {
      Vec o(n);
      rope_forward(o.data(), x.data(), kRopeB, kRopeT, kRopeH, kRopeD, kRopePos0, kRopeTheta, keep);
      return dot(wo, o);
    };
    AccumulatedGrad dx(n, rng);
    rope_backward(dx.data(), wo.data(), kRopeB, kRopeT, kRopeH, kRopeD, kRopePos0, kRopeTheta,
                  keep, /*accumulate=*/true);
    expect_gradient_matches(loss, x, dx.delta(), keep ? "rope dinp (keep)" : "rope dinp");
    testing::expect_written_equals_added(
        {x.size()}, rng,
        [&](double* const* out, bool accumulate) {
          rope_backward(out[0], wo.data(), kRopeB, kRopeT, kRopeH, kRopeD, kRopePos0, kRopeTheta,
                        keep, accumulate);
        },
        keep ? "rope dinp written (keep)" : "rope dinp written");
  }
}

TEST(KernelsBasic, RopeSemantics) {
  std::mt19937_64 rng(6);
  const int D = kRopeD, half = D / 2, n = kRopeB * kRopeT * kRopeH * D;
  const Vec x = random_vector(n, rng);
  Vec plain(n), kept(n);
  rope_forward(plain.data(), x.data(), kRopeB, kRopeT, kRopeH, D, kRopePos0, kRopeTheta, false);
  rope_forward(kept.data(), x.data(), kRopeB, kRopeT, kRopeH, D, kRopePos0, kRopeTheta, true);
  for (int b = 0; b < kRopeB; ++b)
    for (int t = 0; t < kRopeT; ++t)
      for (int h = 0; h < kRopeH; ++h) {
        const int base = ((b * kRopeT + t) * kRopeH + h) * D;
        const double pos = kRopePos0 + t;
        for (int i = 0; i < half; ++i) {
          const double a = pos * std::pow(double(kRopeTheta), -2.0 * i / D);
          const double x1 = x[base + i], x2 = x[base + i + half];
          EXPECT_NEAR(plain[base + i], x1 * std::cos(a) - x2 * std::sin(a), 1e-12);
          EXPECT_NEAR(plain[base + i + half], x2 * std::cos(a) + x1 * std::sin(a), 1e-12);
          if (i < half - 1) {  // pairs away from the control channel are rotated as usual
            EXPECT_EQ(kept[base + i], plain[base + i]);
            EXPECT_EQ(kept[base + i + half], plain[base + i + half]);
          } else {  // the control channel is untouched and rotates as 0
            EXPECT_EQ(kept[base + D - 1], x[base + D - 1]);
            EXPECT_NEAR(kept[base + half - 1], x1 * std::cos(a), 1e-12);
          }
        }
      }

  // The backward is the inverse rotation: without the control channel the map is orthogonal,
  // so J^T (J x) = x.
  Vec back(n, 0.0);
  rope_backward(back.data(), plain.data(), kRopeB, kRopeT, kRopeH, D, kRopePos0, kRopeTheta, false,
                /*accumulate=*/false);
  expect_all_near(back, x, 1e-12, "rope backward inverts forward");

  // out may alias inp
  Vec inplace = x;
  rope_forward(inplace.data(), inplace.data(), kRopeB, kRopeT, kRopeH, D, kRopePos0, kRopeTheta,
               true);
  expect_all_near(inplace, kept, 0.0, "rope in place");
}

// ---------------------------------------------------------------------------------------------
// swiglu

TEST(KernelsBasic, SwigluForwardAndGradients) {
  std::mt19937_64 rng(7);
  const size_t n = 13;  // one row of separate gate and up arrays
  Vec gate = random_vector(n, rng, -3, 3), up = random_vector(n, rng);
  const Vec wo = random_vector(n, rng);
  Vec out(n);
  swiglu_forward(out.data(), gate.data(), up.data(), 1, n, n);
  for (size_t i = 0; i < n; ++i)
    EXPECT_NEAR(out[i], gate[i] / (1 + std::exp(-gate[i])) * up[i], 1e-12);
  auto loss = [&] {
    Vec o(n);
    swiglu_forward(o.data(), gate.data(), up.data(), 1, n, n);
    return dot(wo, o);
  };
  AccumulatedGrad dgate(n, rng), dup(n, rng);
  swiglu_backward(dgate.data(), dup.data(), wo.data(), gate.data(), up.data(), 1, n, n,
                  /*accumulate=*/true);
  expect_gradient_matches(loss, gate, dgate.delta(), "swiglu dgate");
  expect_gradient_matches(loss, up, dup.delta(), "swiglu dup");
  testing::expect_written_equals_added(
      {n, n}, rng,
      [&](double* const* out, bool accumulate) {
        swiglu_backward(out[0], out[1], wo.data(), gate.data(), up.data(), 1, n, n, accumulate);
      },
      "swiglu dgate, dup written");
}

// The fused gate/up projection's output [rows, 2F] read in place (gate = gu, up = gu + F,
// ld = 2F), its gradient written in the same layout.
TEST(KernelsBasic, SwigluReadsTheFusedProjectionInPlace) {
  std::mt19937_64 rng(8);
  const size_t rows = 3, F = 5;
  Vec gu = random_vector(rows * 2 * F, rng, -3, 3);
  const Vec wo = random_vector(rows * F, rng);
  Vec out(rows * F);
  swiglu_forward(out.data(), gu.data(), gu.data() + F, rows, F, 2 * F);
  for (size_t r = 0; r < rows; ++r)
    for (size_t f = 0; f < F; ++f) {
      const double g = gu[r * 2 * F + f], u = gu[r * 2 * F + F + f];
      EXPECT_NEAR(out[r * F + f], g / (1 + std::exp(-g)) * u, 1e-12);
    }
  auto loss = [&] {
    Vec o(rows * F);
    swiglu_forward(o.data(), gu.data(), gu.data() + F, rows, F, 2 * F);
    return dot(wo, o);
  };
  AccumulatedGrad dgu(gu.size(), rng);
  swiglu_backward(dgu.data(), dgu.data() + F, wo.data(), gu.data(), gu.data() + F, rows, F, 2 * F,
                  /*accumulate=*/true);
  expect_gradient_matches(loss, gu, dgu.delta(), "swiglu fused dgate, dup");
}

// ---------------------------------------------------------------------------------------------
// cross-entropy

TEST(KernelsBasic, CrossEntropyForwardAndGradient) {
  std::mt19937_64 rng(8);
  const int N = 4, V = 9;
  const std::vector<int32_t> targets = {3, -1, 0, 8};  // row 1 has no label
  Vec logits = random_vector(N * V, rng, -4, 4);
  logits[2 * V + 5] = 300;  // a large logit: logsumexp must not overflow
  const Vec wl = random_vector(N, rng);
  Vec losses(N);
  cross_entropy_forward(losses.data(), logits.data(), targets.data(), N, V);
  for (int n = 0; n < N; ++n) {
    if (targets[n] < 0) {
      EXPECT_EQ(losses[n], 0.0);
      continue;
    }
    double mx = logits[n * V];
    for (int v = 1; v < V; ++v) mx = std::max(mx, logits[n * V + v]);
    double s = 0;
    for (int v = 0; v < V; ++v) s += std::exp(logits[n * V + v] - mx);
    EXPECT_NEAR(losses[n], mx + std::log(s) - logits[n * V + targets[n]], 1e-10);
  }
  EXPECT_NEAR(losses[2], 300 - logits[2 * V], 1e-9);

  auto loss = [&] {
    Vec l(N);
    cross_entropy_forward(l.data(), logits.data(), targets.data(), N, V);
    return dot(wl, l);
  };
  AccumulatedGrad dlogits(logits.size(), rng);
  cross_entropy_backward(dlogits.data(), logits.data(), targets.data(), wl.data(), N, V,
                         /*accumulate=*/true);
  const Vec d = dlogits.delta();
  expect_gradient_matches(loss, logits, d, "cross_entropy dlogits");
  for (int v = 0; v < V; ++v) EXPECT_EQ(d[1 * V + v], 0.0) << "ignored row got a gradient";
  // Written, the row without a label is set to 0.
  testing::expect_written_equals_added(
      {logits.size()}, rng,
      [&](double* const* out, bool accumulate) {
        cross_entropy_backward(out[0], logits.data(), targets.data(), wl.data(), N, V, accumulate);
      },
      "cross_entropy dlogits written");
}

// Vocabulary-parallel: split the vocabulary unevenly into shards, combine their statistics (in
// a shuffled order: the combination must not depend on it) and compare with the whole-vocabulary
// losses and gradients.
TEST(KernelsBasic, CrossEntropyVocabShardsMatchTheWholeVocabulary) {
  std::mt19937_64 rng(9);
  const int N = 5, V = 11;
  const std::vector<int32_t> targets = {10, -1, 0, 4, 7};
  Vec logits = random_vector(N * V, rng, -4, 4);
  logits[3 * V + 9] = 250;  // the row maximum lives in one shard only
  const Vec dlosses = random_vector(N, rng);
  Vec want(N), want_grad(N * V, 0.0);
  cross_entropy_forward(want.data(), logits.data(), targets.data(), N, V);
  cross_entropy_backward(want_grad.data(), logits.data(), targets.data(), dlosses.data(), N, V,
                         /*accumulate=*/false);

  const std::vector<std::pair<int, int>> shards = {{0, 4}, {4, 4}, {8, 3}};  // begin, rows
  auto shard_logits = [&](int begin, int rows) {
    Vec x(N * rows);
    for (int n = 0; n < N; ++n)
      for (int v = 0; v < rows; ++v) x[n * rows + v] = logits[n * V + begin + v];
    return x;
  };
  Vec stats;  // [shards, 2, N], shards in the order 2, 0, 1
  for (int s : {2, 0, 1}) {
    const auto [begin, rows] = shards[s];
    Vec one(2 * N);
    cross_entropy_shard_stats(one.data(), shard_logits(begin, rows).data(), targets.data(), N,
                              rows, begin);
    stats.insert(stats.end(), one.begin(), one.end());
  }
  Vec losses(N), lse(N);
  cross_entropy_combine_shards(losses.data(), lse.data(), stats.data(), targets.data(), N, 3);
  expect_all_near(losses, want, 1e-12, "combined losses");
  for (const auto& [begin, rows] : shards) {
    Vec grad(N * rows, std::nan(""));  // written whole: the row without a label too
    cross_entropy_shard_backward(grad.data(), shard_logits(begin, rows).data(), lse.data(),
                                 targets.data(), dlosses.data(), N, rows, begin,
                                 /*accumulate=*/false);
    for (int n = 0; n < N; ++n)
      for (int v = 0; v < rows; ++v)
        EXPECT_NEAR(grad[n * rows + v], want_grad[n * V + begin + v], 1e-12)
            << "row " << n << ", vocabulary id " << begin + v;
  }
}

// ---------------------------------------------------------------------------------------------
// optimizer

TEST(KernelsBasic, AdamwOneStepByHand) {
  AdamWHyper hp;
  hp.lr = 0.1f;
  hp.beta1 = 0.9f;
  hp.beta2 = 0.95f;
  hp.eps = 1e-8f;
  hp.weight_decay = 0.1f;
  // element 0: first step from zero state; element 1: third step with existing moments
  {
    float p = 1.0f, g = 2.0f, m = 0.0f, v = 0.0f;
    hp.step = 1;
    adamw_update(&p, &g, &m, &v, 1, hp, 0.5f);
    // g = 1, m = 0.1, v = 0.05, mhat = vhat = 1: p = 1 - 0.1 · (1 / (1 + 1e-8) + 0.1 · 1)
    EXPECT_NEAR(m, 0.1, 1e-7);
    EXPECT_NEAR(v, 0.05, 1e-7);
    EXPECT_NEAR(p, 0.89, 1e-6);
  }
  {
    float p = -0.5f, g = -0.3f, m = 0.02f, v = 0.01f;
    hp.step = 3;
    adamw_update(&p, &g, &m, &v, 1, hp, 0.5f);
    // g = -0.15; m = 0.018 - 0.015 = 0.003; v = 0.0095 + 0.05 · 0.0225 = 0.010625;
    // mhat = 0.003 / 0.271, vhat = 0.010625 / 0.142625; p = -0.5 - 0.1 (mhat / sqrt(vhat) - 0.05)
    EXPECT_NEAR(m, 0.003, 1e-7);
    EXPECT_NEAR(v, 0.010625, 1e-7);
    EXPECT_NEAR(p, -0.49905588196212103, 1e-6);
  }
  // a zero gradient with weight decay only shrinks the parameter: p (1 - lr · wd)
  {
    float p = 2.0f, g = 0.0f, m = 0.0f, v = 0.0f;
    hp.step = 1;
    adamw_update(&p, &g, &m, &v, 1, hp, 1.0f);
    EXPECT_NEAR(p, 2.0 * (1 - 0.1 * 0.1), 1e-6);
  }
}

TEST(KernelsBasic, SumOfSquares) {
  const std::vector<float> x = {1.0f, -2.0f, 0.5f, 3.0f};
  EXPECT_DOUBLE_EQ(sum_of_squares(x.data(), x.size()), 1 + 4 + 0.25 + 9);
  EXPECT_EQ(sum_of_squares(x.data(), 0), 0.0);
}

// ---------------------------------------------------------------------------------------------
// noise

TEST(KernelsBasic, LogisticNoiseIsDeterministicAndLayoutIndependent) {
  const int B = 2, T = 5, Hkv = 4;
  const uint64_t seed = 1234, stream = 7;
  std::vector<double> full(B * T * Hkv), again(full.size());
  logistic_noise(full.data(), B, T, Hkv, seed, stream, 10, 0, Hkv);
  logistic_noise(again.data(), B, T, Hkv, seed, stream, 10, 0, Hkv);
  EXPECT_EQ(full, again);

  // A [B=2] call equals two [B=1] calls at seq0 and seq0 + 1 (data parallelism).
  for (int b = 0; b < B; ++b) {
    std::vector<double> one(T * Hkv);
    logistic_noise(one.data(), 1, T, Hkv, seed, stream, 10 + b, 0, Hkv);
    for (int i = 0; i < T * Hkv; ++i) EXPECT_EQ(one[i], full[b * T * Hkv + i]);
  }
  // A tensor-parallel rank holding KV heads [h0, h0 + 2) sees the matching slice.
  for (int h0 : {0, 2}) {
    std::vector<double> part(B * T * 2);
    logistic_noise(part.data(), B, T, 2, seed, stream, 10, h0, Hkv);
    for (int bt = 0; bt < B * T; ++bt)
      for (int h = 0; h < 2; ++h) EXPECT_EQ(part[bt * 2 + h], full[bt * Hkv + h0 + h]);
  }
  // float and double draw the same values up to float rounding
  std::vector<float> f(full.size());
  logistic_noise(f.data(), B, T, Hkv, seed, stream, 10, 0, Hkv);
  expect_all_near(f, full, 1e-6, "noise float vs double");
  // a different seed or stream gives different numbers
  std::vector<double> other(full.size());
  logistic_noise(other.data(), B, T, Hkv, seed + 1, stream, 10, 0, Hkv);
  EXPECT_NE(other, full);
  logistic_noise(other.data(), B, T, Hkv, seed, stream + 1, 10, 0, Hkv);
  EXPECT_NE(other, full);
}

TEST(KernelsBasic, LogisticNoiseMoments) {
  // Logistic(0, 1): mean 0, variance pi^2 / 3. Standard errors over 100k samples: about 0.006 for
  // the mean and 0.02 for the variance; the tolerances are ~5 of those.
  const int n = 100000;
  std::vector<double> x(n);
  logistic_noise(x.data(), 1, n, 1, 99, 3, 0, 0, 1);
  double mean = 0;
  for (double v : x) mean += v;
  mean /= n;
  double var = 0;
  for (double v : x) var += (v - mean) * (v - mean);
  var /= n - 1;
  EXPECT_NEAR(mean, 0.0, 0.03);
  EXPECT_NEAR(var, M_PI * M_PI / 3, 0.1);
}

}  // namespace
}  // namespace dmc
