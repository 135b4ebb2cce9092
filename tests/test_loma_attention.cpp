// LoMA attention (kernels/loma_attention.h): the forward against softmax attention under the dense
// mask, the backward against finite differences, and RoPE at explicit positions.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/loma_attention.h"
#include "kernels/rope.h"
#include "kernels/rope_positions.h"
#include "tests/gradcheck.h"

namespace dmc {
namespace {

using kernels::LomaZones;

struct Shape {
  int B, H, Hkv, D, chunks;
  LomaZones z;
  int T() const { return chunks * z.chunk(); }
};

// Softmax attention with the mask as an explicit -inf bias, from loma_allowed over the full square.
std::vector<double> DenseAttention(const Shape& s, const std::vector<double>& q,
                                   const std::vector<double>& k, const std::vector<double>& v,
                                   double scale) {
  const int T = s.T(), G = s.H / s.Hkv, D = s.D;
  std::vector<double> out(q.size(), 0.0), w(T);
  for (int b = 0; b < s.B; ++b)
    for (int g = 0; g < s.H; ++g)
      for (int t = 0; t < T; ++t) {
        const double* qt = &q[((size_t(b) * T + t) * s.H + g) * D];
        double mx = -INFINITY, sum = 0;
        for (int i = 0; i < T; ++i) {
          const double* ki = &k[((size_t(b) * T + i) * s.Hkv + g / G) * D];
          double dotp = 0;
          for (int c = 0; c < D; ++c) dotp += qt[c] * ki[c];
          w[i] = kernels::loma_allowed(t, i, s.z) ? scale * dotp : -INFINITY;
          mx = std::max(mx, w[i]);
        }
        for (int i = 0; i < T; ++i) sum += (w[i] = std::exp(w[i] - mx));
        double* o = &out[((size_t(b) * T + t) * s.H + g) * D];
        for (int i = 0; i < T; ++i)
          for (int c = 0; c < D; ++c)
            o[c] += w[i] / sum * v[((size_t(b) * T + i) * s.Hkv + g / G) * D + c];
      }
  return out;
}

const Shape kShapes[] = {{2, 4, 2, 4, 3, {2, 2}}, {1, 2, 1, 6, 2, {1, 4}},
                         {1, 3, 3, 4, 3, {3, 1}}, {1, 2, 2, 4, 2, {4, 4}}};

TEST(LomaAttention, ForwardEqualsDenseMaskedSoftmax) {
  for (const Shape& s : kShapes) {
    std::mt19937_64 rng(5);
    const size_t nq = size_t(s.B) * s.T() * s.H * s.D, nkv = size_t(s.B) * s.T() * s.Hkv * s.D;
    auto q = testing::random_vector(nq, rng, -2, 2), k = testing::random_vector(nkv, rng, -2, 2),
         v = testing::random_vector(nkv, rng);
    const float scale = 0.5f;
    std::vector<double> out(nq), lse(size_t(s.B) * s.H * s.T());
    kernels::loma_attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), s.B,
                                    s.T(), s.H, s.Hkv, s.D, s.z, scale);
    testing::expect_all_near(out, DenseAttention(s, q, k, v, scale), 1e-12, "out");
    for (double l : lse) EXPECT_TRUE(std::isfinite(l));
  }
}

TEST(LomaAttention, BackwardMatchesFiniteDifferences) {
  for (const Shape& s : kShapes) {
    std::mt19937_64 rng(9);
    const size_t nq = size_t(s.B) * s.T() * s.H * s.D, nkv = size_t(s.B) * s.T() * s.Hkv * s.D;
    auto q = testing::random_vector(nq, rng, -2, 2), k = testing::random_vector(nkv, rng, -2, 2),
         v = testing::random_vector(nkv, rng);
    const auto w = testing::random_vector(nq, rng);  // loss = w · out
    const float scale = 0.7f;
    std::vector<double> out(nq), lse(size_t(s.B) * s.H * s.T());
    auto loss = [&] {
      kernels::loma_attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), s.B,
                                      s.T(), s.H, s.Hkv, s.D, s.z, scale);
      return testing::dot(w, out);
    };
    loss();
    testing::AccumulatedGrad dq(nq, rng), dk(nkv, rng), dv(nkv, rng);
    kernels::loma_attention_backward(dq.data(), dk.data(), dv.data(), w.data(), q.data(), k.data(),
                                     v.data(), out.data(), lse.data(), s.B, s.T(), s.H, s.Hkv,
                                     s.D, s.z, scale, /*accumulate=*/true);
    testing::expect_written_equals_added(
        {nq, nkv, nkv}, rng,
        [&](double* const* g, bool accumulate) {
          kernels::loma_attention_backward(g[0], g[1], g[2], w.data(), q.data(), k.data(),
                                           v.data(), out.data(), lse.data(), s.B, s.T(), s.H,
                                           s.Hkv, s.D, s.z, scale, accumulate);
        },
        "dq, dk, dv written");
    testing::expect_gradient_matches(loss, q, dq.delta(), "dq");
    testing::expect_gradient_matches(loss, k, dk.delta(), "dk");
    testing::expect_gradient_matches(loss, v, dv.delta(), "dv");
  }
}

// RoPE at explicit positions equals plain RoPE token by token, and its backward is the adjoint.
TEST(LomaRopePositions, MatchesRopeAtEachPositionAndBackwardIsAdjoint) {
  const int B = 2, T = 5, H = 3, D = 8;
  const std::vector<int32_t> positions = {0, 7, 3, 3, 12};
  std::mt19937_64 rng(2);
  auto x = testing::random_vector(size_t(B) * T * H * D, rng);
  for (bool keep : {false, true}) {
    std::vector<double> out(x.size()), ref(H * D);
    kernels::rope_forward_positions(out.data(), x.data(), B, T, H, D, positions.data(), 100.0f,
                                    keep);
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < T; ++t) {
        const size_t base = (size_t(b) * T + t) * H * D;
        // a sequence of positions[t] + 1 tokens whose last token is this one
        std::vector<double> seq(size_t(positions[t] + 1) * H * D, 0.0), rot(seq.size());
        std::copy(x.begin() + base, x.begin() + base + H * D, seq.end() - H * D);
        kernels::rope_forward(rot.data(), seq.data(), 1, positions[t] + 1, H, D, 0, 100.0f, keep);
        for (int i = 0; i < H * D; ++i)
          EXPECT_NEAR(out[base + i], rot[rot.size() - H * D + i], 1e-12);
      }
    const auto w = testing::random_vector(x.size(), rng);
    auto loss = [&] {
      kernels::rope_forward_positions(out.data(), x.data(), B, T, H, D, positions.data(), 100.0f,
                                      keep);
      return testing::dot(w, out);
    };
    testing::AccumulatedGrad dx(x.size(), rng);
    kernels::rope_backward_positions(dx.data(), w.data(), B, T, H, D, positions.data(), 100.0f,
                                     keep, /*accumulate=*/true);
    testing::expect_gradient_matches(loss, x, dx.delta(), "dx");
    testing::expect_written_equals_added(
        {x.size()}, rng,
        [&](double* const* g, bool accumulate) {
          kernels::rope_backward_positions(g[0], w.data(), B, T, H, D, positions.data(), 100.0f,
                                           keep, accumulate);
        },
        "dx written");
  }
}

}  // namespace
}  // namespace dmc
