// GPU vs CPU reference for the DMC head logic: logistic noise, gates (relaxed and hard), the
// windowed scan (forward and reverse mode), the compression-ratio loss.
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/control_channel.h"
#include "kernels/cr_loss.h"
#include "kernels/dmc_gates.h"
#include "kernels/dmc_scan.h"
#include "kernels/noise.h"
#include "tests/cuda/cuda_test_util.h"

namespace dmc::cuda_test {
namespace {
namespace K = dmc::kernels;
namespace C = dmc::cuda;

class CudaDmc : public ::testing::Test {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

TEST_F(CudaDmc, LogisticNoise) {
  const int B = 3, T = 101, Hl = 4, Htot = 8, h0 = 4;
  const long seq0 = 17;
  const uint64_t seed = 1234 + rng()() % 1000, stream = 7;
  const size_t n = static_cast<size_t>(B) * T * Hl;
  DevBuf<float> d(n);
  d.poison();
  C::logistic_noise(d, B, T, Hl, seed, stream, seq0, h0, Htot);
  std::vector<double> ref(n);
  K::logistic_noise<double>(ref.data(), B, T, Hl, seed, stream, seq0, h0, Htot);
  expect_close("logistic_noise (same counters)", d.download(), ref, 1e-6);
}

struct GateInputs {
  int B = 2, T = 53, H = 6, Hkv = 3, D = 64;
  std::vector<double> q, k, noise;
  std::vector<bf16> qb, kb;
  std::vector<float> noisef;
  GateInputs() {
    const size_t nq = static_cast<size_t>(B) * T * H * D, nk = static_cast<size_t>(B) * T * Hkv * D;
    q = randn(nq);
    k = randn(nk);
    for (size_t i = D - 1; i < nk; i += D) k[i] = 5.0 + randn(1, 3.0)[0];  // decisions both ways
    for (size_t i = D - 1; i < nq; i += D) q[i] = randn(1, 3.0)[0];
    qb = to_bf16(q);
    kb = to_bf16(k);
    noise.resize(static_cast<size_t>(B) * T * Hkv);
    K::logistic_noise<double>(noise.data(), B, T, Hkv, 99, 1, 0, 0, Hkv);
    noisef = to_f32(noise);
  }
  size_t ns() const { return static_cast<size_t>(B) * T * Hkv; }
};

TEST_F(CudaDmc, Gates) {
  for (auto mode : {K::DmcDecisionMode::kRelaxed, K::DmcDecisionMode::kHard}) {
    const bool relaxed = mode == K::DmcDecisionMode::kRelaxed;
    GateInputs in;
    K::DmcGateParams prm;
    prm.mode = mode;
    const size_t ns = in.ns();
    DevBuf<bf16> dq(in.qb), dk(in.kb);
    DevBuf<float> dnoise(in.noisef), lg(ns), al(ns), mg(ns), mk(ns), om(ns);
    for (auto* b : {&lg, &al, &mg, &mk, &om}) b->poison();
    C::DmcGateTensors out{lg, al, mg, mk, om};
    C::dmc_gates_forward(out, dq, dk, dnoise, in.B, in.T, in.H, in.Hkv, in.D, prm);
    std::vector<double> rlg(ns), ral(ns), rmg(ns), rmk(ns), rom(ns);
    K::DmcGateTensors<double> rout{rlg.data(), ral.data(), rmg.data(), rmk.data(), rom.data()};
    K::dmc_gates_forward<double>(rout, in.q.data(), in.k.data(), in.noise.data(), in.B, in.T, in.H,
                                 in.Hkv, in.D, prm);
    expect_close(relaxed ? "gates fwd logit (relaxed)" : "gates fwd logit (hard)", lg.download(),
                 rlg, 1e-5);
    expect_close(relaxed ? "gates fwd alpha (relaxed)" : "gates fwd alpha (hard)", al.download(),
                 ral, 1e-5);
    expect_close(relaxed ? "gates fwd merge (relaxed)" : "gates fwd merge (hard)", mg.download(),
                 rmg, 1e-5);
    expect_close(relaxed ? "gates fwd mask (relaxed)" : "gates fwd mask (hard)", mk.download(),
                 rmk, 1e-5);
    expect_close("gates fwd omega", om.download(), rom, 1e-5);
    {
      // The same gates from rows of a Q, K, V product (the decode step's layout): equal bits.
      const long qd = static_cast<long>(in.H) * in.D, kd = static_cast<long>(in.Hkv) * in.D;
      const long ld = qd + 2 * kd, tokens = static_cast<long>(in.B) * in.T;
      std::vector<bf16> rows(tokens * ld, __float2bfloat16(7.f));
      for (long t = 0; t < tokens; ++t) {
        std::copy_n(in.qb.begin() + t * qd, qd, rows.begin() + t * ld);
        std::copy_n(in.kb.begin() + t * kd, kd, rows.begin() + t * ld + qd);
      }
      DevBuf<bf16> drows(rows);
      DevBuf<float> lg2(ns), al2(ns), mg2(ns), mk2(ns), om2(ns);
      C::dmc_gates_forward({lg2, al2, mg2, mk2, om2}, drows, drows.ptr + qd, dnoise, in.B, in.T,
                           in.H, in.Hkv, in.D, prm, nullptr, ld);
      EXPECT_TRUE(same_bits(lg2.download(), lg.download())) << "logit from Q, K, V rows";
      EXPECT_TRUE(same_bits(al2.download(), al.download())) << "alpha from Q, K, V rows";
      EXPECT_TRUE(same_bits(mg2.download(), mg.download())) << "merge from Q, K, V rows";
      EXPECT_TRUE(same_bits(mk2.download(), mk.download())) << "mask from Q, K, V rows";
      EXPECT_TRUE(same_bits(om2.download(), om.download())) << "omega from Q, K, V rows";
    }

    // backward: random upstream gradients, random initial dq/dk (accumulation)
    auto ga = randn(ns), gm = randn(ns), gk = randn(ns), go = randn(ns);
    auto gaf = to_f32(ga), gmf = to_f32(gm), gkf = to_f32(gk), gof = to_f32(go);
    auto dqi = randn(in.q.size(), 0.01), dki = randn(in.k.size(), 0.01);
    auto dqib = to_bf16(dqi), dkib = to_bf16(dki);
    DevBuf<float> dga(gaf), dgm(gmf), dgk(gkf), dgo(gof);
    DevBuf<bf16> ddq(dqib), ddk(dkib);
    C::dmc_gates_backward(ddq, ddk, dga, dgm, dgk, dgo, dq, lg, al, in.B, in.T, in.H, in.Hkv, in.D,
                          prm);
    // the reference reads the kernel's own logit/alpha (float-rounded), so only the backward differs
    auto lgd = as_double(lg.download()), ald = as_double(al.download());
    K::dmc_gates_backward<double>(dqi.data(), dki.data(), ga.data(), gm.data(), gk.data(),
                                  go.data(), in.q.data(), lgd.data(), ald.data(), in.B, in.T, in.H,
                                  in.Hkv, in.D, prm);
    expect_close(relaxed ? "gates bwd dq (relaxed)" : "gates bwd dq (hard)", ddq.download(), dqi,
                 kBf16Tol);
    expect_close(relaxed ? "gates bwd dk (relaxed)" : "gates bwd dk (hard)", ddk.download(), dki,
                 kBf16Tol);
  }
}

// One tensor (pair false) or keys and values in one launch (true) against the CPU reference per
// tensor, dalpha and domega receiving both tensors' contributions. The kernels take tiles of 64
// tokens and stage the window in chunks of 80 rows (one chunk up to w = 17, three from w = 98), so
// the cases cross those edges: T not a multiple of 64 and T < w, w from 1 to 100, D 20 (the
// scalar path), 64 and 128, alpha exactly 0 or 1. dx is written into a poisoned buffer
// (accumulate false, the model's call), then added to random values with the gate gradients left
// out, and the gate gradients are accumulated alone (dx null).
struct ScanCase {
  int T, window, D;
  bool hard;
};

void check_scan(const ScanCase& sc, bool pair) {
  const int B = 2, Hkv = 3, T = sc.T, D = sc.D, window = sc.window, nv = pair ? 2 : 1;
  const size_t ns = static_cast<size_t>(B) * T * Hkv, nx = ns * D;
  const std::string tag = std::string(pair ? "kv" : "x") + " T" + std::to_string(T) + " w" +
                          std::to_string(window) + (sc.hard ? " hard" : " soft") + " D" +
                          std::to_string(D);
  auto alpha = randu(ns, 0.0, 1.0), omega = randu(ns, 0.3, 1.0);
  if (sc.hard)
    for (auto& a : alpha) a = a > 0.5 ? 1.0 : 0.0;
  auto af = to_f32(alpha), of = to_f32(omega);
  DevBuf<float> da(af), dom(of), dden(ns);
  dden.poison();

  std::vector<double> x[2], hat[2], den(ns);
  DevBuf<bf16> dev_x[2] = {DevBuf<bf16>(nx), DevBuf<bf16>(nx)};
  DevBuf<bf16> dev_hat[2] = {DevBuf<bf16>(nx), DevBuf<bf16>(nx)};
  for (int i = 0; i < nv; ++i) {
    x[i] = randn(nx);
    dev_x[i].upload(to_bf16(x[i]));
    dev_hat[i].poison();
  }
  if (pair)
    C::dmc_scan_forward_kv(dev_hat[0], dev_hat[1], dden, dev_x[0], dev_x[1], da, dom, B, T, Hkv, D,
                           window);
  else
    C::dmc_scan_forward(dev_hat[0], dden, dev_x[0], da, dom, B, T, Hkv, D, window);
  for (int i = 0; i < nv; ++i) {
    hat[i].resize(nx);
    K::dmc_scan_forward<double>(hat[i].data(), den.data(), x[i].data(), alpha.data(), omega.data(),
                                B, T, Hkv, D, window);
    expect_close(("scan fwd hat " + std::to_string(i) + " " + tag).c_str(), dev_hat[i].download(),
                 hat[i], kBf16Tol);
  }
  expect_close(("scan fwd denom " + tag).c_str(), dden.download(), den, kF32Tol);

  // the reference gets the kernel's hats and denom, as the model would pass them
  const auto dn = as_double(dden.download());
  std::vector<double> g[2], dx_ref[2];
  DevBuf<bf16> dev_g[2] = {DevBuf<bf16>(nx), DevBuf<bf16>(nx)};
  DevBuf<bf16> dev_dx[2] = {DevBuf<bf16>(nx), DevBuf<bf16>(nx)};
  auto ga = randn(ns), go = randn(ns);
  DevBuf<float> dga(to_f32(ga)), dgo(to_f32(go));
  const auto ga0 = ga, go0 = go;
  for (int i = 0; i < nv; ++i) {
    g[i] = randn(nx);
    dev_g[i].upload(to_bf16(g[i]));
    dev_dx[i].poison();
    const auto h = as_double(dev_hat[i].download());
    dx_ref[i].resize(nx);
    K::dmc_scan_backward<double>(dx_ref[i].data(), ga.data(), go.data(), g[i].data(), x[i].data(),
                                 h.data(), alpha.data(), omega.data(), dn.data(), B, T, Hkv, D,
                                 window, /*accumulate=*/false);
  }
  auto backward = [&](bf16* dx0, bf16* dx1, float* dalpha, float* domega, bool accumulate) {
    if (pair)
      C::dmc_scan_backward_kv(dx0, dx1, dalpha, domega, dev_g[0], dev_g[1], dev_x[0], dev_x[1],
                              dev_hat[0], dev_hat[1], da, dom, dden, B, T, Hkv, D, window,
                              accumulate);
    else
      C::dmc_scan_backward(dx0, dalpha, domega, dev_g[0], dev_x[0], dev_hat[0], da, dom, dden, B,
                           T, Hkv, D, window, accumulate);
  };
  backward(dev_dx[0], dev_dx[1], dga, dgo, false);
  for (int i = 0; i < nv; ++i)
    expect_close(("scan bwd dx (written) " + std::to_string(i) + " " + tag).c_str(),
                 dev_dx[i].download(), dx_ref[i], kBf16Tol);
  expect_close(("scan bwd dalpha (+=) " + tag).c_str(), dga.download(), ga, 1e-4);
  expect_close(("scan bwd domega (+=) " + tag).c_str(), dgo.download(), go, 1e-4);

  // dx added to what it held, without the gate gradients
  for (int i = 0; i < nv; ++i) {
    auto start = randn(nx, 0.1);
    dev_dx[i].upload(to_bf16(start));
    for (size_t n = 0; n < nx; ++n) dx_ref[i][n] += start[n];
  }
  backward(dev_dx[0], dev_dx[1], nullptr, nullptr, true);
  for (int i = 0; i < nv; ++i)
    expect_close(("scan bwd dx (+=) " + std::to_string(i) + " " + tag).c_str(),
                 dev_dx[i].download(), dx_ref[i], kBf16Tol);

  // the gate gradients alone, from zero
  DevBuf<float> dga2(std::vector<float>(ns, 0.f)), dgo2(std::vector<float>(ns, 0.f));
  backward(nullptr, nullptr, dga2, dgo2, false);
  for (size_t n = 0; n < ns; ++n) {
    ga[n] -= ga0[n];
    go[n] -= go0[n];
  }
  expect_close(("scan bwd dalpha alone " + tag).c_str(), dga2.download(), ga, 1e-4);
  expect_close(("scan bwd domega alone " + tag).c_str(), dgo2.download(), go, 1e-4);
}

const ScanCase kScanCases[] = {
    {77, 12, 64, false},  {77, 12, 128, true},  {128, 12, 128, false}, {200, 5, 128, false},
    {77, 12, 20, false},  {77, 1, 64, false},   {150, 17, 128, false}, {150, 18, 64, true},
    {130, 33, 20, false}, {77, 70, 64, false},  {300, 98, 64, true},   {200, 100, 128, false},
    {60, 100, 64, true},  {5, 12, 128, false},  {33, 40, 20, true},
};

TEST_F(CudaDmc, Scan) {
  for (const ScanCase& sc : kScanCases) check_scan(sc, false);
}

TEST_F(CudaDmc, ScanKeysAndValuesTogether) {
  for (const ScanCase& sc : kScanCases) check_scan(sc, true);
}

TEST_F(CudaDmc, CrLoss) {
  // 61 × 3: one block per sequence; 4099 × 16: many blocks, the last one partial.
  for (const auto& [B, T, Hkv] : {std::tuple{5, 61, 3}, std::tuple{3, 4099, 16}}) {
    const size_t ns = static_cast<size_t>(B) * T * Hkv;
    auto merge = randu(ns, 0.0, 1.0);
    for (auto& m : merge) m = m > 0.6 ? 1.0 : 0.0;
    auto mf = to_f32(merge);
    auto mm = randu(B, 0.0, 0.2);
    auto mmf = to_f32(mm);
    const double scale = 1.0 / (2.0 * T * Hkv);
    DevBuf<float> dmerge(mf), dmm(mmf);
    C::cr_accumulate_merge(dmm, dmerge, B, T, Hkv, static_cast<float>(scale));
    K::cr_accumulate_merge<double>(mm.data(), merge.data(), B, T, Hkv, static_cast<float>(scale));
    auto mmd = dmm.download();
    expect_close("cr accumulate mean_merge", mmd, mm, 1e-6);

    const float prior = 0.5f;
    DevBuf<float> dloss(1);
    dloss.poison();
    C::cr_loss_forward(dloss, dmm, B, prior);
    const double rl = K::cr_loss_forward<double>(mm.data(), B, prior);
    expect_close("cr loss", dloss.download(), std::vector<double>{rl}, 1e-6);

    auto g = randn(B);
    auto gf = to_f32(g);
    DevBuf<float> dg(gf);
    C::cr_loss_backward(dg, dmm, B, prior, 1.0f);
    K::cr_loss_backward<double>(g.data(), mm.data(), B, prior, 1.0);
    expect_close("cr loss bwd (+=)", dg.download(), g, 1e-6);

    auto dme = randn(ns);
    auto dmef = to_f32(dme);
    DevBuf<float> ddme(dmef);
    C::cr_accumulate_merge_backward(ddme, dg, B, T, Hkv, static_cast<float>(scale));
    K::cr_accumulate_merge_backward<double>(dme.data(), g.data(), B, T, Hkv, scale);
    expect_close("cr accumulate bwd dmerge (+=)", ddme.download(), dme, 1e-6);
  }
}

TEST_F(CudaDmc, ScaleLastChannel) {
  const long rows = 301;
  const int D = 64;
  auto x = randn(static_cast<size_t>(rows) * D);
  auto xb = to_bf16(x);
  DevBuf<bf16> dx(xb);
  C::scale_last_channel(dx, rows, D, 0.375f);
  K::scale_last_channel<double>(x.data(), rows, D, 0.375);
  expect_close("scale_last_channel", dx.download(), x, kBf16Tol);
}

}  // namespace
}  // namespace dmc::cuda_test
