// CPU reference kernels, the DMC ops (gates, windowed accumulation, masked GQA attention,
// compression-ratio loss): finite-difference gradient checks in double on tiny odd shapes, and
// semantic checks against direct formulas and naive references written out here.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/cr_loss.h"
#include "kernels/dmc_attention.h"
#include "kernels/dmc_gates.h"
#include "kernels/dmc_scan.h"
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

double sigmoid(double x) { return 1 / (1 + std::exp(-x)); }

// ---------------------------------------------------------------------------------------------
// gates

struct GateShape {
  int B, T, H, Hkv, D;
  size_t nq() const { return size_t(B) * T * H * D; }
  size_t nk() const { return size_t(B) * T * Hkv * D; }
  size_t ns() const { return size_t(B) * T * Hkv; }
};

struct GateOut {
  Vec logit, alpha, merge, mask, omega;
  explicit GateOut(size_t n) : logit(n), alpha(n), merge(n), mask(n), omega(n) {}
  DmcGateTensors<double> tensors() {
    return {logit.data(), alpha.data(), merge.data(), mask.data(), omega.data()};
  }
};

void gates_gradcheck(const GateShape& s, const DmcGateParams& p, double ctrl_lo, double ctrl_hi,
                     double noise_amp, const char* name) {
  std::mt19937_64 rng(11);
  Vec q = random_vector(s.nq(), rng), k = random_vector(s.nk(), rng);
  // control channels in the range where the sigmoids are not saturated
  for (size_t r = 0; r < s.nq() / s.D; ++r) q[r * s.D + s.D - 1] = random_vector(1, rng, -1, 1)[0];
  for (size_t r = 0; r < s.nk() / s.D; ++r)
    k[r * s.D + s.D - 1] = random_vector(1, rng, ctrl_lo, ctrl_hi)[0];
  const Vec noise = random_vector(s.ns(), rng, -noise_amp, noise_amp);
  const Vec wa = random_vector(s.ns(), rng), wm = random_vector(s.ns(), rng),
            wo = random_vector(s.ns(), rng);
  // merge is piecewise constant (straight-through), so it is left out of the numeric loss
  auto loss = [&] {
    GateOut o(s.ns());
    dmc_gates_forward(o.tensors(), q.data(), k.data(), noise.data(), s.B, s.T, s.H, s.Hkv, s.D, p);
    return dot(wa, o.alpha) + dot(wm, o.mask) + dot(wo, o.omega);
  };
  GateOut o(s.ns());
  dmc_gates_forward(o.tensors(), q.data(), k.data(), noise.data(), s.B, s.T, s.H, s.Hkv, s.D, p);
  AccumulatedGrad dq(s.nq(), rng), dk(s.nk(), rng);
  dmc_gates_backward(dq.data(), dk.data(), wa.data(), static_cast<const double*>(nullptr),
                     wm.data(), wo.data(), q.data(), o.logit.data(), o.alpha.data(), s.B, s.T, s.H,
                     s.Hkv, s.D, p);
  expect_gradient_matches(loss, q, dq.delta(), (std::string(name) + " dq").c_str());
  expect_gradient_matches(loss, k, dk.delta(), (std::string(name) + " dk").c_str());
}

TEST(KernelsDmc, GatesGradientsRelaxedGroupedQueries) {
  DmcGateParams p;
  p.init_val = 0.4f;
  p.temperature = 0.8f;
  gates_gradcheck({2, 5, 4, 2, 3}, p, -1, 1, 1.0, "gates G=2");
}

TEST(KernelsDmc, GatesGradientsRelaxedDefaultParams) {
  // the default init_val 5 and temperature 0.1, with k's control channel near 5 so that the
  // logits (k - 5 + noise) / 0.1 stay in a range with useful gradients
  gates_gradcheck({1, 6, 3, 3, 4}, DmcGateParams{}, 4.8, 5.2, 0.1, "gates G=1");
}

TEST(KernelsDmc, GatesRelaxedForwardSemantics) {
  std::mt19937_64 rng(12);
  const GateShape s{2, 5, 4, 2, 3};
  DmcGateParams p;
  p.init_val = 0.4f;
  p.temperature = 0.8f;
  const Vec q = random_vector(s.nq(), rng, -2, 2), k = random_vector(s.nk(), rng, -2, 2);
  const Vec noise = random_vector(s.ns(), rng, -2, 2);
  GateOut o(s.ns());
  dmc_gates_forward(o.tensors(), q.data(), k.data(), noise.data(), s.B, s.T, s.H, s.Hkv, s.D, p);
  const int G = s.H / s.Hkv, D = s.D;
  for (int b = 0; b < s.B; ++b)
    for (int t = 0; t < s.T; ++t)
      for (int h = 0; h < s.Hkv; ++h) {
        const size_t i = (size_t(b) * s.T + t) * s.Hkv + h;
        const double logit = (k[i * D + D - 1] - p.init_val + noise[i]) / p.temperature;
        EXPECT_NEAR(o.logit[i], logit, 1e-12);
        EXPECT_NEAR(o.alpha[i], sigmoid(logit), 1e-12);
        EXPECT_EQ(o.merge[i], o.alpha[i] >= 0.5 ? 1.0 : 0.0);
        double qm = 0;
        for (int g = h * G; g < (h + 1) * G; ++g)
          qm += q[((size_t(b) * s.T + t) * s.H + g) * D + D - 1];
        EXPECT_NEAR(o.omega[i], sigmoid(qm / G + p.init_val) + p.omega_eps, 1e-12);
        // the mask of key t comes from the decision of token t + 1
        if (t == s.T - 1)
          EXPECT_EQ(o.mask[i], 0.0);
        else
          EXPECT_NEAR(o.mask[i], std::log(1 - o.alpha[i + s.Hkv]), 1e-10);
      }
  // some of both decisions, so the merge check above is not vacuous
  double merges = 0;
  for (double m : o.merge) merges += m;
  EXPECT_GT(merges, 0);
  EXPECT_LT(merges, double(s.ns()));
}

TEST(KernelsDmc, GatesMergeIsStraightThrough) {
  // relaxed: d merge / d logit = alpha (1 - alpha), the same as d alpha / d logit
  std::mt19937_64 rng(13);
  const GateShape s{1, 4, 2, 1, 3};
  DmcGateParams p;
  p.init_val = 0.2f;
  p.temperature = 0.5f;
  const Vec q = random_vector(s.nq(), rng), k = random_vector(s.nk(), rng);
  const Vec noise = random_vector(s.ns(), rng), w = random_vector(s.ns(), rng);
  GateOut o(s.ns());
  dmc_gates_forward(o.tensors(), q.data(), k.data(), noise.data(), s.B, s.T, s.H, s.Hkv, s.D, p);
  Vec dq1(s.nq()), dk1(s.nk()), dq2(s.nq()), dk2(s.nk());
  const double* none = nullptr;
  dmc_gates_backward(dq1.data(), dk1.data(), w.data(), none, none, none, q.data(), o.logit.data(),
                     o.alpha.data(), s.B, s.T, s.H, s.Hkv, s.D, p);
  dmc_gates_backward(dq2.data(), dk2.data(), none, w.data(), none, none, q.data(), o.logit.data(),
                     o.alpha.data(), s.B, s.T, s.H, s.Hkv, s.D, p);
  expect_all_near(dk2, dk1, 1e-15, "dk via merge vs via alpha");
  for (size_t r = 0; r < dk1.size() / s.D; ++r)
    EXPECT_NEAR(dk1[r * s.D + s.D - 1], w[r] * o.alpha[r] * (1 - o.alpha[r]) / p.temperature,
                1e-12);
  for (double x : dq1) EXPECT_EQ(x, 0.0);  // no domega given
}

TEST(KernelsDmc, GatesHardMode) {
  // one sequence, one KV head with two query heads; a = k[D-1] - 5
  const int B = 1, T = 6, H = 2, Hkv = 1, D = 2;
  const Vec a = {-1, 1, 0.5, -2, 2, -3};
  Vec k(T * D, 0.3), q(T * H * D, 0.1);
  for (int t = 0; t < T; ++t) k[t * D + D - 1] = a[t] + 5;
  DmcGateParams p;
  p.mode = DmcDecisionMode::kHard;
  GateOut o(T);
  dmc_gates_forward(o.tensors(), q.data(), k.data(), static_cast<const double*>(nullptr), B, T, H,
                    Hkv, D, p);
  const Vec alpha = {0, 1, 1, 0, 1, 0};
  const Vec mask = {-50000, -50000, 0, -50000, 0, 0};  // from alpha[t+1]; the last key gets 0
  for (int t = 0; t < T; ++t) {
    EXPECT_NEAR(o.logit[t], a[t], 1e-12);
    EXPECT_EQ(o.alpha[t], alpha[t]);
    EXPECT_EQ(o.merge[t], alpha[t]);
    EXPECT_EQ(o.mask[t], mask[t]);
    EXPECT_NEAR(o.omega[t], sigmoid(0.1 + 5) + p.omega_eps, 1e-12);
  }
  // straight-through: dk = (dalpha + dmerge) sigmoid'(a) (no temperature); the mask is constant
  std::mt19937_64 rng(14);
  const Vec da = random_vector(T, rng), dm = random_vector(T, rng), dmask = random_vector(T, rng),
            dom = random_vector(T, rng);
  Vec dq(q.size()), dk(k.size());
  dmc_gates_backward(dq.data(), dk.data(), da.data(), dm.data(), dmask.data(), dom.data(), q.data(),
                     o.logit.data(), o.alpha.data(), B, T, H, Hkv, D, p);
  const double so = sigmoid(0.1 + 5);
  for (int t = 0; t < T; ++t) {
    const double sg = sigmoid(a[t]);
    EXPECT_NEAR(dk[t * D + D - 1], (da[t] + dm[t]) * sg * (1 - sg), 1e-12);
    EXPECT_EQ(dk[t * D], 0.0);
    for (int g = 0; g < H; ++g)
      EXPECT_NEAR(dq[(t * H + g) * D + D - 1], dom[t] * so * (1 - so) / H, 1e-12);
  }
}

// ---------------------------------------------------------------------------------------------
// scan

// xhat and denom straight from the definition, recomputing every product.
void scan_direct(Vec& xhat, Vec& denom, const Vec& x, const Vec& alpha, const Vec& omega, int B,
                 int T, int Hkv, int D, int w) {
  xhat.assign(x.size(), 0.0);
  denom.assign(alpha.size(), 0.0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hkv; ++h)
      for (int t = 0; t < T; ++t) {
        const size_t st = (size_t(b) * T + t) * Hkv + h;
        for (int j = std::max(0, t - w + 1); j <= t; ++j) {
          const size_t sj = (size_t(b) * T + j) * Hkv + h;
          double c = omega[sj];
          for (int m = j + 1; m <= t; ++m) c *= alpha[(size_t(b) * T + m) * Hkv + h];
          denom[st] += c;
          for (int d = 0; d < D; ++d) xhat[st * D + d] += c * x[sj * D + d];
        }
        for (int d = 0; d < D; ++d) xhat[st * D + d] /= denom[st];
      }
}

void scan_gradcheck(Vec x, Vec alpha, Vec omega, int B, int T, int Hkv, int D, int w,
                    const char* name) {
  std::mt19937_64 rng(21);
  const Vec wo = random_vector(x.size(), rng);
  Vec xhat(x.size()), denom(alpha.size());
  dmc_scan_forward(xhat.data(), denom.data(), x.data(), alpha.data(), omega.data(), B, T, Hkv, D,
                   w);
  Vec rx, rd;
  scan_direct(rx, rd, x, alpha, omega, B, T, Hkv, D, w);
  expect_all_near(xhat, rx, 1e-12, (std::string(name) + " xhat").c_str());
  expect_all_near(denom, rd, 1e-12, (std::string(name) + " denom").c_str());

  // the numeric side differentiates the direct formula, independently of the kernel
  auto loss = [&] {
    Vec y, dn;
    scan_direct(y, dn, x, alpha, omega, B, T, Hkv, D, w);
    return dot(wo, y);
  };
  AccumulatedGrad dx(x.size(), rng), da(alpha.size(), rng), dom(omega.size(), rng);
  dmc_scan_backward(dx.data(), da.data(), dom.data(), wo.data(), x.data(), xhat.data(),
                    alpha.data(), omega.data(), denom.data(), B, T, Hkv, D, w, /*accumulate=*/true);
  const Vec ga = da.delta();
  for (double g : ga) EXPECT_TRUE(std::isfinite(g));
  expect_gradient_matches(loss, x, dx.delta(), (std::string(name) + " dx").c_str());
  expect_gradient_matches(loss, alpha, ga, (std::string(name) + " dalpha").c_str());
  expect_gradient_matches(loss, omega, dom.delta(), (std::string(name) + " domega").c_str());
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hkv; ++h)
      EXPECT_EQ(ga[size_t(b) * T * Hkv + h], 0.0) << "alpha[0] is unused";

  // dalpha and domega may be null
  AccumulatedGrad dx2(x.size(), rng);
  dmc_scan_backward(dx2.data(), static_cast<double*>(nullptr), static_cast<double*>(nullptr),
                    wo.data(), x.data(), xhat.data(), alpha.data(), omega.data(), denom.data(), B,
                    T, Hkv, D, w, /*accumulate=*/true);
  expect_all_near(dx2.delta(), dx.delta(), 1e-12, (std::string(name) + " dx alone").c_str());

  // accumulate false writes dx over whatever it held; the gate gradients still accumulate
  Vec dx3 = random_vector(x.size(), rng);
  AccumulatedGrad da3(alpha.size(), rng), dom3(omega.size(), rng);
  dmc_scan_backward(dx3.data(), da3.data(), dom3.data(), wo.data(), x.data(), xhat.data(),
                    alpha.data(), omega.data(), denom.data(), B, T, Hkv, D, w,
                    /*accumulate=*/false);
  expect_all_near(dx3, dx.delta(), 1e-12, (std::string(name) + " dx written").c_str());
  expect_all_near(da3.delta(), ga, 1e-12, (std::string(name) + " dalpha (+=)").c_str());
  expect_all_near(dom3.delta(), dom.delta(), 1e-12, (std::string(name) + " domega (+=)").c_str());
}

TEST(KernelsDmc, ScanGradientsSoft) {
  std::mt19937_64 rng(22);
  const int B = 2, T = 9, Hkv = 2, D = 3, w = 4;  // T > window: truncation matters
  scan_gradcheck(random_vector(B * T * Hkv * D, rng), random_vector(B * T * Hkv, rng, 0.05, 0.95),
                 random_vector(B * T * Hkv, rng, 0.3, 1.2), B, T, Hkv, D, w, "scan soft");
}

TEST(KernelsDmc, ScanGradientsWithHardZerosAndOnes) {
  // alpha exactly 0 and 1 (hard decisions): no division by alpha may happen in the backward
  std::mt19937_64 rng(23);
  const int B = 1, T = 11, Hkv = 2, D = 2, w = 5;
  Vec alpha = {0.3, 0,   1, 1, 0, 0.7, 1, 1, 1,   1, 0, 1, 0.5, 0, 1,
               1,   0.2, 0, 1, 1, 1,   0, 1, 0.9, 1, 0, 1, 1,   0, 1};
  alpha.resize(B * T * Hkv);
  scan_gradcheck(random_vector(B * T * Hkv * D, rng), alpha,
                 random_vector(B * T * Hkv, rng, 0.3, 1.2), B, T, Hkv, D, w, "scan hard");
}

TEST(KernelsDmc, ScanSemantics) {
  std::mt19937_64 rng(24);
  const int B = 2, T = 7, Hkv = 2, D = 3;
  const Vec x = random_vector(B * T * Hkv * D, rng);
  const Vec omega = random_vector(B * T * Hkv, rng, 0.3, 1.2);
  Vec xhat(x.size()), denom(omega.size());

  // alpha = 0: no accumulation, xhat = x and denom = omega
  Vec alpha(omega.size(), 0.0);
  dmc_scan_forward(xhat.data(), denom.data(), x.data(), alpha.data(), omega.data(), B, T, Hkv, D,
                   4);
  expect_all_near(xhat, x, 1e-14, "alpha=0 xhat");
  expect_all_near(denom, omega, 1e-14, "alpha=0 denom");

  // alpha = 1 and T <= window: the omega-weighted mean of the prefix
  alpha.assign(omega.size(), 1.0);
  dmc_scan_forward(xhat.data(), denom.data(), x.data(), alpha.data(), omega.data(), B, T, Hkv, D,
                   T);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hkv; ++h)
      for (int t = 0; t < T; ++t) {
        double num[3] = {0, 0, 0}, den = 0;
        for (int j = 0; j <= t; ++j) {
          const size_t sj = (size_t(b) * T + j) * Hkv + h;
          den += omega[sj];
          for (int d = 0; d < D; ++d) num[d] += omega[sj] * x[sj * D + d];
        }
        const size_t st = (size_t(b) * T + t) * Hkv + h;
        EXPECT_NEAR(denom[st], den, 1e-12);
        for (int d = 0; d < D; ++d) EXPECT_NEAR(xhat[st * D + d], num[d] / den, 1e-12);
      }

  // truncation: with window 3 a token older than 3 positions contributes nothing
  const int w = 3;
  dmc_scan_forward(xhat.data(), denom.data(), x.data(), alpha.data(), omega.data(), B, T, Hkv, D,
                   w);
  Vec x2 = x, xhat2(x.size()), denom2(omega.size());
  for (int d = 0; d < D; ++d) x2[d] += 10;  // token 0 of (b=0, h=0)
  dmc_scan_forward(xhat2.data(), denom2.data(), x2.data(), alpha.data(), omega.data(), B, T, Hkv, D,
                   w);
  for (int t = 0; t < T; ++t)
    for (int d = 0; d < D; ++d) {
      const size_t i = (size_t(t) * Hkv) * D + d;  // (b=0, t, h=0, d)
      if (t < w)
        EXPECT_GT(std::fabs(xhat2[i] - xhat[i]), 1e-3) << "t=" << t;
      else
        EXPECT_EQ(xhat2[i], xhat[i]) << "t=" << t;
    }
}

// ---------------------------------------------------------------------------------------------
// attention

struct AttnShape {
  int B, T, H, Hkv, D;
  size_t nq() const { return size_t(B) * T * H * D; }
  size_t nk() const { return size_t(B) * T * Hkv * D; }
  size_t ns() const { return size_t(B) * T * Hkv; }
};

// Naive reference: explicit scores, softmax and weighted sum per query, written from the formula
// in kernels/dmc_attention.h (GQA by index arithmetic, mask added for i < t only).
void naive_attention(Vec& out, Vec& lse, const Vec& q, const Vec& k, const Vec& v,
                     const double* mask, const AttnShape& s, bool exclude_ctrl, double scale) {
  out.assign(s.nq(), 0.0);
  lse.assign(size_t(s.B) * s.H * s.T, 0.0);
  const int G = s.H / s.Hkv, D = s.D, Dqk = exclude_ctrl ? D - 1 : D;
  for (int b = 0; b < s.B; ++b)
    for (int g = 0; g < s.H; ++g) {
      const int h = g / G;
      for (int t = 0; t < s.T; ++t) {
        const size_t qi = ((size_t(b) * s.T + t) * s.H + g) * D;
        Vec sc(t + 1);
        double mx = -1e300;
        for (int i = 0; i <= t; ++i) {
          const size_t ki = ((size_t(b) * s.T + i) * s.Hkv + h) * D;
          double d = 0;
          for (int c = 0; c < Dqk; ++c) d += q[qi + c] * k[ki + c];
          sc[i] = scale * d + (mask && i < t ? mask[(size_t(b) * s.T + i) * s.Hkv + h] : 0.0);
          mx = std::max(mx, sc[i]);
        }
        double sum = 0;
        for (int i = 0; i <= t; ++i) sum += std::exp(sc[i] - mx);
        for (int i = 0; i <= t; ++i) {
          const double p = std::exp(sc[i] - mx) / sum;
          const size_t vi = ((size_t(b) * s.T + i) * s.Hkv + h) * D;
          for (int c = 0; c < D; ++c) out[qi + c] += p * v[vi + c];
        }
        lse[(size_t(b) * s.H + g) * s.T + t] = mx + std::log(sum);
      }
    }
}

void attention_gradcheck(const AttnShape& s, bool use_mask, bool exclude_ctrl, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const double scale = 1 / std::sqrt(double(s.D));
  Vec q = random_vector(s.nq(), rng, -1.5, 1.5), k = random_vector(s.nk(), rng, -1.5, 1.5),
      v = random_vector(s.nk(), rng), mask = random_vector(s.ns(), rng, -3, 0);
  const Vec wo = random_vector(s.nq(), rng);
  const double* mptr = use_mask ? mask.data() : nullptr;
  Vec out(s.nq()), lse(size_t(s.B) * s.H * s.T);
  dmc_attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), mptr, s.B, s.T, s.H,
                        s.Hkv, s.D, exclude_ctrl, float(scale));
  Vec rout, rlse;
  naive_attention(rout, rlse, q, k, v, mptr, s, exclude_ctrl, float(scale));
  expect_all_near(out, rout, 1e-12, "attention out vs naive");
  expect_all_near(lse, rlse, 1e-12, "attention lse vs naive");

  auto loss = [&] {
    Vec o(s.nq()), l(lse.size());
    dmc_attention_forward(o.data(), l.data(), q.data(), k.data(), v.data(),
                          use_mask ? mask.data() : nullptr, s.B, s.T, s.H, s.Hkv, s.D, exclude_ctrl,
                          float(scale));
    return dot(wo, o);
  };
  AccumulatedGrad dq(s.nq(), rng), dk(s.nk(), rng), dv(s.nk(), rng), dmask(s.ns(), rng);
  dmc_attention_backward(dq.data(), dk.data(), dv.data(), use_mask ? dmask.data() : nullptr,
                         wo.data(), q.data(), k.data(), v.data(), mptr, out.data(), lse.data(), s.B,
                         s.T, s.H, s.Hkv, s.D, exclude_ctrl, float(scale), /*accumulate=*/true);
  const std::string tag = std::string(use_mask ? " mask" : " nomask") +
                          (exclude_ctrl ? " exclude_ctrl" : "") +
                          " G=" + std::to_string(s.H / s.Hkv);
  const Vec gq = dq.delta(), gk = dk.delta();
  expect_gradient_matches(loss, q, gq, ("attention dq" + tag).c_str());
  expect_gradient_matches(loss, k, gk, ("attention dk" + tag).c_str());
  expect_gradient_matches(loss, v, dv.delta(), ("attention dv" + tag).c_str());
  if (use_mask) {
    const Vec gm = dmask.delta();
    expect_gradient_matches(loss, mask, gm, ("attention dmask" + tag).c_str());
    for (int b = 0; b < s.B; ++b)  // the last key is never masked
      for (int h = 0; h < s.Hkv; ++h) EXPECT_EQ(gm[(size_t(b) * s.T + s.T - 1) * s.Hkv + h], 0.0);
  }
  if (exclude_ctrl) {  // the control channel takes no part, so gets exactly no gradient
    for (size_t r = 0; r < s.nq() / s.D; ++r) EXPECT_EQ(gq[r * s.D + s.D - 1], 0.0);
    for (size_t r = 0; r < s.nk() / s.D; ++r) EXPECT_EQ(gk[r * s.D + s.D - 1], 0.0);
  }
  // Written whole (the control channel's zeros too) without accumulate.
  testing::expect_written_equals_added(
      {s.nq(), s.nk(), s.nk(), use_mask ? s.ns() : 0}, rng,
      [&](double* const* g, bool accumulate) {
        dmc_attention_backward(g[0], g[1], g[2], g[3], wo.data(), q.data(), k.data(), v.data(),
                               mptr, out.data(), lse.data(), s.B, s.T, s.H, s.Hkv, s.D,
                               exclude_ctrl, float(scale), accumulate);
      },
      ("attention gradients written" + tag).c_str());
}

TEST(KernelsDmc, AttentionGradientsGqaMaskExcludeCtrl) {
  attention_gradcheck({2, 7, 4, 2, 5}, true, true, 31);
}
TEST(KernelsDmc, AttentionGradientsGqaMaskWithCtrl) {
  attention_gradcheck({2, 7, 4, 2, 5}, true, false, 32);
}
TEST(KernelsDmc, AttentionGradientsNoMask) {
  attention_gradcheck({1, 5, 3, 1, 3}, false, false, 33);
  attention_gradcheck({1, 6, 2, 2, 4}, false, true, 34);
}

TEST(KernelsDmc, AttentionMaskSemantics) {
  std::mt19937_64 rng(35);
  const AttnShape s{2, 6, 4, 2, 4};
  const float scale = 0.5f;
  const Vec q = random_vector(s.nq(), rng), k = random_vector(s.nk(), rng),
            v = random_vector(s.nk(), rng);
  Vec plain(s.nq()), lse(size_t(s.B) * s.H * s.T);
  dmc_attention_forward(plain.data(), lse.data(), q.data(), k.data(), v.data(),
                        static_cast<const double*>(nullptr), s.B, s.T, s.H, s.Hkv, s.D, true,
                        scale);

  // A zero mask is the same as no mask, and both match a plain causal softmax.
  Vec zero_mask(s.ns(), 0.0), out(s.nq()), rout, rlse;
  dmc_attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), zero_mask.data(), s.B,
                        s.T, s.H, s.Hkv, s.D, true, scale);
  expect_all_near(out, plain, 0.0, "zero mask vs no mask");
  naive_attention(rout, rlse, q, k, v, nullptr, s, true, scale);
  expect_all_near(out, rout, 1e-12, "zero mask vs naive softmax");
  expect_all_near(lse, rlse, 1e-12, "lse vs naive");

  // Every key masked with -50000: the diagonal is exempt, so each query sees exactly itself.
  Vec hard(s.ns(), -50000.0);
  dmc_attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), hard.data(), s.B, s.T,
                        s.H, s.Hkv, s.D, true, scale);
  for (int b = 0; b < s.B; ++b)
    for (int t = 0; t < s.T; ++t)
      for (int g = 0; g < s.H; ++g)
        for (int c = 0; c < s.D; ++c)
          EXPECT_NEAR(out[((size_t(b) * s.T + t) * s.H + g) * s.D + c],
                      v[((size_t(b) * s.T + t) * s.Hkv + g / 2) * s.D + c], 1e-12);

  // Masking key j = 2 of (b = 1, h = 1) only: queries up to j are unchanged; later queries of
  // that KV head's two query heads behave as if key j did not exist (the naive reference with
  // key j's logit at -inf reproduces it); everything else is unchanged.
  const int j = 2;
  Vec one(s.ns(), 0.0);
  one[(size_t(1) * s.T + j) * s.Hkv + 1] = -50000;
  dmc_attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), one.data(), s.B, s.T,
                        s.H, s.Hkv, s.D, true, scale);
  Vec inf_mask(s.ns(), 0.0);
  inf_mask[(size_t(1) * s.T + j) * s.Hkv + 1] = -1e300;
  naive_attention(rout, rlse, q, k, v, inf_mask.data(), s, true, scale);
  expect_all_near(out, rout, 1e-12, "single masked key vs naive without it");
  for (int b = 0; b < s.B; ++b)
    for (int t = 0; t < s.T; ++t)
      for (int g = 0; g < s.H; ++g) {
        const bool affected = b == 1 && g / 2 == 1 && t > j;
        const size_t o = ((size_t(b) * s.T + t) * s.H + g) * s.D;
        double diff = 0;
        for (int c = 0; c < s.D; ++c) diff += std::fabs(out[o + c] - plain[o + c]);
        if (affected)
          EXPECT_GT(diff, 1e-6) << "b=" << b << " t=" << t << " g=" << g;
        else
          EXPECT_EQ(diff, 0.0) << "b=" << b << " t=" << t << " g=" << g;
      }

  // exclude_ctrl: channel D-1 of q and k does not change the output
  Vec q2 = q, k2 = k, out2(s.nq());
  for (size_t r = 0; r < s.nq() / s.D; ++r) q2[r * s.D + s.D - 1] = 7.0;
  for (size_t r = 0; r < s.nk() / s.D; ++r) k2[r * s.D + s.D - 1] = -3.0;
  dmc_attention_forward(out2.data(), lse.data(), q2.data(), k2.data(), v.data(),
                        static_cast<const double*>(nullptr), s.B, s.T, s.H, s.Hkv, s.D, true,
                        scale);
  expect_all_near(out2, plain, 0.0, "exclude_ctrl ignores channel D-1");
}

// ---------------------------------------------------------------------------------------------
// compression-ratio loss

TEST(KernelsDmc, CrLossForwardAndGradients) {
  std::mt19937_64 rng(41);
  const int L = 2, B = 3, T = 4, Hkv = 2, n = B * T * Hkv;
  const double prior = 0.65, scale = 1.0 / (L * T * Hkv);
  // per-sequence merge levels 0.2, 0.5, 0.8 (+-0.1): the first two are under the prior and
  // pay the hinge, the last is over it and must get no gradient; all well away from the kink.
  std::vector<Vec> merge(L, Vec(n));
  for (auto& m : merge)
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < T * Hkv; ++i)
        m[b * T * Hkv + i] = 0.2 + 0.3 * b + random_vector(1, rng, -0.1, 0.1)[0];

  auto mean_merge_of = [&] {
    Vec mm(B, 0.0);
    for (int l = 0; l < L; ++l) cr_accumulate_merge(mm.data(), merge[l].data(), B, T, Hkv, scale);
    return mm;
  };
  const Vec mm = mean_merge_of();
  for (int b = 0; b < B; ++b) {
    double s = 0;
    for (int l = 0; l < L; ++l)
      for (int i = 0; i < T * Hkv; ++i) s += merge[l][b * T * Hkv + i];
    EXPECT_NEAR(mm[b], s / (L * T * Hkv), 1e-14);
  }
  ASSERT_GT(prior - mm[1], 0.02);
  ASSERT_GT(mm[2] - prior, 0.02);
  const double loss_value = cr_loss_forward(mm.data(), B, prior);
  EXPECT_NEAR(loss_value, ((prior - mm[0]) + (prior - mm[1])) / B, 1e-14);

  const double dloss = 1.7;
  Vec dmm(B, 0.0);
  cr_loss_backward(dmm.data(), mm.data(), B, prior, dloss);
  EXPECT_NEAR(dmm[0], -dloss / B, 1e-14);
  EXPECT_NEAR(dmm[1], -dloss / B, 1e-14);
  EXPECT_EQ(dmm[2], 0.0);

  for (int l = 0; l < L; ++l) {
    auto loss = [&] {
      const Vec m = mean_merge_of();
      return dloss * cr_loss_forward(m.data(), B, prior);
    };
    AccumulatedGrad dmerge(n, rng);
    cr_accumulate_merge_backward(dmerge.data(), dmm.data(), B, T, Hkv, scale);
    expect_gradient_matches(loss, merge[l], dmerge.delta(), "cr dmerge");
  }

  // accumulation: a second layer's statistics add to the first
  Vec acc(B, 1.0);
  cr_accumulate_merge(acc.data(), merge[0].data(), B, T, Hkv, scale);
  Vec fresh(B, 0.0);
  cr_accumulate_merge(fresh.data(), merge[0].data(), B, T, Hkv, scale);
  for (int b = 0; b < B; ++b) EXPECT_NEAR(acc[b], 1.0 + fresh[b], 1e-14);
}

}  // namespace
}  // namespace dmc
