// DMS kernels (model/DMS.md §1–§4): the decision gates, the delayed-eviction mask mode of the DMC
// attention and the KL distillation loss, against finite differences and explicit references.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kernels/dmc_attention.h"
#include "kernels/dms_gates.h"
#include "kernels/kl_distill.h"
#include "tests/gradcheck.h"

namespace dmc {
namespace {

using kernels::DmcDecisionMode;
using kernels::DmsGateParams;
using testing::AccumulatedGrad;
using testing::dot;
using testing::expect_gradient_matches;
using testing::random_vector;
using Vec = std::vector<double>;

// The relaxed gates: the mask's gradient is a derivative of the forward, and evict's
// straight-through gradient is alpha's, so loss = we·alpha + wm·mask checks both.
TEST(KernelsDms, GatesBackwardMatchesFiniteDifferences) {
  const int B = 2, T = 5, Hkv = 3;
  const size_t n = size_t(B) * T * Hkv;
  std::mt19937_64 rng(4);
  Vec x = random_vector(n, rng, -0.1, 0.1), noise = random_vector(n, rng, -2, 2);
  const Vec we = random_vector(n, rng), wm = random_vector(n, rng);
  // a soft regime where sigmoid' is not tiny
  const DmsGateParams p{5.0f, 0.2f, 0.7f, DmcDecisionMode::kRelaxed};
  Vec logit(n), alpha(n), evict(n), mask(n);
  auto loss = [&] {
    Vec l(n), a(n), m(n);
    kernels::dms_gates_forward<double>(l.data(), a.data(), nullptr, m.data(), x.data(),
                                       noise.data(), B, T, Hkv, p);
    return dot(we, a) + dot(wm, m);
  };
  kernels::dms_gates_forward<double>(logit.data(), alpha.data(), evict.data(), mask.data(),
                                     x.data(), noise.data(), B, T, Hkv, p);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_NEAR(logit[i], (p.scale * x[i] - p.offset + noise[i]) / p.temperature, 1e-12);
    EXPECT_EQ(evict[i], alpha[i] >= 0.5 ? 1.0 : 0.0);
  }
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hkv; ++h)  // the last key has no next token: never masked
      EXPECT_EQ(mask[(size_t(b) * T + T - 1) * Hkv + h], 0.0);
  AccumulatedGrad dx(n, rng);
  kernels::dms_gates_backward(dx.data(), we.data(), wm.data(), logit.data(), alpha.data(), B, T,
                              Hkv, p, /*accumulate=*/true);
  expect_gradient_matches(loss, x, dx.delta(), "dms gates dx");
  testing::expect_written_equals_added(
      {n}, rng,
      [&](double* const* out, bool accumulate) {
        kernels::dms_gates_backward(out[0], we.data(), wm.data(), logit.data(), alpha.data(), B, T,
                                    Hkv, p, accumulate);
      },
      "dms gates dx written");
}

// Hard decisions: d = 1[s·x - c > 0]; key j is removed (-inf) iff d[j+1] = 1.
TEST(KernelsDms, HardMaskRemovesKeysMarkedByTheNextToken) {
  const int T = 6;
  // model/DMS.md §3's example: d = (0, 1, 0, 1, 0, 0)
  const Vec x = {0.0, 0.06, 0.0, 0.06, 0.0, 0.0};
  Vec logit(T), alpha(T), evict(T), mask(T);
  const DmsGateParams p{100.0f, 5.0f, 0.1f, DmcDecisionMode::kHard};
  kernels::dms_gates_forward<double>(logit.data(), alpha.data(), evict.data(), mask.data(),
                                     x.data(), nullptr, 1, T, 1, p);
  const double inf = std::numeric_limits<double>::infinity();
  EXPECT_EQ(evict, Vec({0, 1, 0, 1, 0, 0}));
  EXPECT_EQ(mask, Vec({-inf, 0, -inf, 0, 0, 0}));
}

// The example of model/DMS.md §3 (T = 6, w = 2, d = (0,1,0,1,0,0)): each query attends exactly to
// the keys the hard form leaves visible.
TEST(KernelsDms, WindowedHardMaskAttendsToTheVisibleKeysOnly) {
  const int T = 6, D = 4, w = 2;
  std::mt19937_64 rng(8);
  const Vec q = random_vector(size_t(T) * D, rng), k = random_vector(size_t(T) * D, rng),
            v = random_vector(size_t(T) * D, rng);
  const double inf = std::numeric_limits<double>::infinity();
  const Vec mask = {-inf, 0, -inf, 0, 0, 0};
  const float scale = 0.5f;
  Vec out(size_t(T) * D), lse(T);
  kernels::dmc_attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), mask.data(),
                                 1, T, 1, 1, D, false, scale, w);
  // visible[t] per the spec's table: token 0 seen by queries 0-2, token 2 by 2-4
  const std::vector<std::vector<int>> visible = {{0}, {0, 1}, {0, 1, 2}, {1, 2, 3},
                                                 {1, 2, 3, 4}, {1, 3, 4, 5}};
  for (int t = 0; t < T; ++t) {
    Vec s;
    double mx = -inf;
    for (int j : visible[t]) {
      double d = 0;
      for (int c = 0; c < D; ++c) d += q[t * D + c] * k[j * D + c];
      s.push_back(scale * d);
      mx = std::max(mx, s.back());
    }
    double sum = 0;
    for (double x : s) sum += std::exp(x - mx);
    for (int c = 0; c < D; ++c) {
      double o = 0;
      for (size_t i = 0; i < s.size(); ++i) o += std::exp(s[i] - mx) / sum * v[visible[t][i] * D + c];
      EXPECT_NEAR(out[t * D + c], o, 1e-12) << "query " << t;
    }
  }
}

// The soft mask in window mode: gradients of q, k, v and the mask by finite differences; keys
// within w of the last query are never masked and get no mask gradient.
TEST(KernelsDms, WindowedAttentionBackwardMatchesFiniteDifferences) {
  const int B = 2, T = 7, H = 4, Hkv = 2, D = 4, w = 2;
  std::mt19937_64 rng(12);
  const size_t nq = size_t(B) * T * H * D, nk = size_t(B) * T * Hkv * D, ns = size_t(B) * T * Hkv;
  Vec q = random_vector(nq, rng, -1.5, 1.5), k = random_vector(nk, rng, -1.5, 1.5),
      v = random_vector(nk, rng), mask = random_vector(ns, rng, -3, 0);
  const Vec wo = random_vector(nq, rng);
  const float scale = 0.5f;
  Vec out(nq), lse(size_t(B) * H * T);
  auto loss = [&] {
    Vec o(nq), l(lse.size());
    kernels::dmc_attention_forward(o.data(), l.data(), q.data(), k.data(), v.data(), mask.data(),
                                   B, T, H, Hkv, D, false, scale, w);
    return dot(wo, o);
  };
  kernels::dmc_attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(),
                                 mask.data(), B, T, H, Hkv, D, false, scale, w);
  AccumulatedGrad dq(nq, rng), dk(nk, rng), dv(nk, rng), dmask(ns, rng);
  kernels::dmc_attention_backward(dq.data(), dk.data(), dv.data(), dmask.data(), wo.data(),
                                  q.data(), k.data(), v.data(), mask.data(), out.data(),
                                  lse.data(), B, T, H, Hkv, D, false, scale, /*accumulate=*/true,
                                  w);
  const Vec gm = dmask.delta();
  expect_gradient_matches(loss, q, dq.delta(), "windowed attention dq");
  expect_gradient_matches(loss, k, dk.delta(), "windowed attention dk");
  expect_gradient_matches(loss, v, dv.delta(), "windowed attention dv");
  expect_gradient_matches(loss, mask, gm, "windowed attention dmask");
  for (int b = 0; b < B; ++b)
    for (int j = T - 1 - w; j < T; ++j)
      for (int h = 0; h < Hkv; ++h) EXPECT_EQ(gm[(size_t(b) * T + j) * Hkv + h], 0.0) << j;
  testing::expect_written_equals_added(
      {nq, nk, nk, ns}, rng,
      [&](double* const* g, bool accumulate) {
        kernels::dmc_attention_backward(g[0], g[1], g[2], g[3], wo.data(), q.data(), k.data(),
                                        v.data(), mask.data(), out.data(), lse.data(), B, T, H,
                                        Hkv, D, false, scale, accumulate, w);
      },
      "windowed attention dq, dk, dv, dmask written");
}

double LogSumExp(const double* x, int V) {
  double m = -std::numeric_limits<double>::infinity(), s = 0;
  for (int v = 0; v < V; ++v) m = std::max(m, x[v]);
  for (int v = 0; v < V; ++v) s += std::exp(x[v] - m);
  return m + std::log(s);
}

// KL(student || teacher): the value against its definition, the gradient by finite differences,
// and two vocabulary shards summing to the whole.
TEST(KernelsDms, KlDistillationMatchesDefinitionAndFiniteDifferences) {
  const int N = 4, V = 7;
  std::mt19937_64 rng(21);
  Vec s = random_vector(size_t(N) * V, rng, -2, 2);
  const Vec u = random_vector(size_t(N) * V, rng, -2, 2);
  const Vec weight = {0.5, 0.0, 0.25, 0.25};  // row 1 not counted
  auto lses = [&](const Vec& x) {
    Vec l(N);
    for (int n = 0; n < N; ++n) l[n] = LogSumExp(x.data() + size_t(n) * V, V);
    return l;
  };
  const Vec lse_u = lses(u);
  auto loss = [&] {
    const Vec lse_s = lses(s);
    Vec kl(N);
    kernels::kl_distill_shard(kl.data(), s.data(), u.data(), lse_s.data(), lse_u.data(),
                              weight.data(), N, V);
    return dot(weight, kl);
  };
  const Vec lse_s = lses(s);
  Vec kl(N);
  kernels::kl_distill_shard(kl.data(), s.data(), u.data(), lse_s.data(), lse_u.data(),
                            weight.data(), N, V);
  for (int n = 0; n < N; ++n) {
    double expect = 0;
    for (int v = 0; v < V; ++v) {
      const double p = std::exp(s[n * V + v] - lse_s[n]), pt = std::exp(u[n * V + v] - lse_u[n]);
      expect += p * std::log(p / pt);
    }
    EXPECT_NEAR(kl[n], weight[n] != 0 ? expect : 0.0, 1e-12) << "row " << n;
    if (weight[n] != 0) {
      EXPECT_GT(kl[n], 0.0);
    }
  }
  // vocabulary shards [0, 3) and [3, 7): the partial sums add up to the whole
  Vec s0, s1, u0, u1;
  for (int n = 0; n < N; ++n)
    for (int v = 0; v < V; ++v) {
      (v < 3 ? s0 : s1).push_back(s[n * V + v]);
      (v < 3 ? u0 : u1).push_back(u[n * V + v]);
    }
  Vec p0(N), p1(N);
  kernels::kl_distill_shard(p0.data(), s0.data(), u0.data(), lse_s.data(), lse_u.data(),
                            weight.data(), N, 3);
  kernels::kl_distill_shard(p1.data(), s1.data(), u1.data(), lse_s.data(), lse_u.data(),
                            weight.data(), N, V - 3);
  for (int n = 0; n < N; ++n) EXPECT_NEAR(p0[n] + p1[n], kl[n], 1e-12);

  AccumulatedGrad ds(s.size(), rng);
  kernels::kl_distill_shard_backward(ds.data(), s.data(), u.data(), lse_s.data(), lse_u.data(),
                                     kl.data(), weight.data(), 1.0, N, V, /*accumulate=*/true);
  expect_gradient_matches(loss, s, ds.delta(), "kl dstudent");
  testing::expect_written_equals_added(
      {s.size()}, rng,
      [&](double* const* out, bool accumulate) {
        kernels::kl_distill_shard_backward(out[0], s.data(), u.data(), lse_s.data(), lse_u.data(),
                                           kl.data(), weight.data(), 1.0, N, V, accumulate);
      },
      "kl dstudent written");
}

}  // namespace
}  // namespace dmc
