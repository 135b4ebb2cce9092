// Stand-alone check of the fused DMC attention kernels against a direct double-precision
// implementation of kernels/dmc_attention.h's formulas (no CMake, no CPU library needed):
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I. kernels/dmc_attention.cu \
//        kernels/dmc_attention_sm90.cu kernels/dmc_attention_bwd_sm90.cu kernels/cuda_common.cu \
//        tests/cuda/attention_selfcheck.cu -o attention_selfcheck
// Prints the relative error of every output; exit status 1 if any exceeds 1e-2 or is NaN.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

using dmc::cuda::bf16;

namespace {

std::mt19937_64 rng(std::random_device{}());

struct Case {
  int B, T, H, Hkv, D;
  bool xctrl;
  int mask;  // 0 none, 1 soft, 2 hard
  double qs;
};

void ref_forward(std::vector<double>& out, std::vector<double>& lse, const std::vector<double>& q,
                 const std::vector<double>& k, const std::vector<double>& v,
                 const std::vector<double>* mask, const Case& c, double scale) {
  const int G = c.H / c.Hkv, Dqk = c.xctrl ? c.D - 1 : c.D;
  std::vector<double> s(c.T);
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.H; ++h)
      for (int t = 0; t < c.T; ++t) {
        const int hk = h / G;
        const double* qr = &q[((static_cast<size_t>(b) * c.T + t) * c.H + h) * c.D];
        double m = -INFINITY;
        for (int i = 0; i <= t; ++i) {
          const double* kr = &k[((static_cast<size_t>(b) * c.T + i) * c.Hkv + hk) * c.D];
          double d = 0;
          for (int x = 0; x < Dqk; ++x) d += qr[x] * kr[x];
          s[i] = scale * d + ((mask && i < t) ? (*mask)[(static_cast<size_t>(b) * c.T + i) * c.Hkv + hk] : 0.0);
          m = std::max(m, s[i]);
        }
        double l = 0;
        for (int i = 0; i <= t; ++i) l += std::exp(s[i] - m);
        double* o = &out[((static_cast<size_t>(b) * c.T + t) * c.H + h) * c.D];
        for (int x = 0; x < c.D; ++x) o[x] = 0;
        for (int i = 0; i <= t; ++i) {
          const double p = std::exp(s[i] - m) / l;
          const double* vr = &v[((static_cast<size_t>(b) * c.T + i) * c.Hkv + hk) * c.D];
          for (int x = 0; x < c.D; ++x) o[x] += p * vr[x];
        }
        lse[(static_cast<size_t>(b) * c.H + h) * c.T + t] = m + std::log(l);
      }
}

void ref_backward(std::vector<double>& dq, std::vector<double>& dk, std::vector<double>& dv,
                  std::vector<double>* dmask, const std::vector<double>& dout,
                  const std::vector<double>& q, const std::vector<double>& k,
                  const std::vector<double>& v, const std::vector<double>* mask,
                  const std::vector<double>& out, const std::vector<double>& lse, const Case& c,
                  double scale) {
  const int G = c.H / c.Hkv, Dqk = c.xctrl ? c.D - 1 : c.D;
  std::vector<double> p(c.T), dp(c.T);
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.H; ++h)
      for (int t = 0; t < c.T; ++t) {
        const int hk = h / G;
        const size_t qo = ((static_cast<size_t>(b) * c.T + t) * c.H + h) * c.D;
        const double L = lse[(static_cast<size_t>(b) * c.H + h) * c.T + t];
        double delta = 0;
        for (int x = 0; x < c.D; ++x) delta += dout[qo + x] * out[qo + x];
        for (int i = 0; i <= t; ++i) {
          const size_t ko = ((static_cast<size_t>(b) * c.T + i) * c.Hkv + hk) * c.D;
          double d = 0, e = 0;
          for (int x = 0; x < Dqk; ++x) d += q[qo + x] * k[ko + x];
          for (int x = 0; x < c.D; ++x) e += dout[qo + x] * v[ko + x];
          const double s = scale * d + ((mask && i < t) ? (*mask)[(static_cast<size_t>(b) * c.T + i) * c.Hkv + hk] : 0.0);
          const double pi = std::exp(s - L);
          const double ds = pi * (e - delta);
          for (int x = 0; x < Dqk; ++x) {
            dq[qo + x] += scale * ds * k[ko + x];
            dk[ko + x] += scale * ds * q[qo + x];
          }
          for (int x = 0; x < c.D; ++x) dv[ko + x] += pi * dout[qo + x];
          if (dmask && i < t) (*dmask)[(static_cast<size_t>(b) * c.T + i) * c.Hkv + hk] += ds;
        }
      }
}

std::vector<double> randn(size_t n, double s) {
  std::normal_distribution<double> d(0, s);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}
std::vector<bf16> round_bf16(std::vector<double>& v) {
  std::vector<bf16> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    o[i] = __float2bfloat16(static_cast<float>(v[i]));
    v[i] = __bfloat162float(o[i]);
  }
  return o;
}
template <typename T>
T* upload(const std::vector<T>& h) {
  T* d;
  DMC_CUDA_CHECK(cudaMalloc(&d, sizeof(T) * std::max<size_t>(1, h.size())));
  DMC_CUDA_CHECK(cudaMemcpy(d, h.data(), sizeof(T) * h.size(), cudaMemcpyHostToDevice));
  return d;
}
template <typename T>
std::vector<double> download(const T* d, size_t n) {
  std::vector<T> h(n);
  DMC_CUDA_CHECK(cudaDeviceSynchronize());
  DMC_CUDA_CHECK(cudaMemcpy(h.data(), d, sizeof(T) * n, cudaMemcpyDeviceToHost));
  std::vector<double> o(n);
  for (size_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, bf16>)
      o[i] = __bfloat162float(h[i]);
    else
      o[i] = h[i];
  }
  return o;
}
double rel(const std::vector<double>& a, const std::vector<double>& r) {
  double n = 0, d = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    n += (a[i] - r[i]) * (a[i] - r[i]);
    d += r[i] * r[i];
  }
  return d > 0 ? std::sqrt(n / d) : std::sqrt(n);
}

}  // namespace

int main(int argc, char** argv) {
  const bool small = argc > 1 && std::string(argv[1]) == "small";
  const Case cases[] = {{2, 200, 4, 2, 64, true, 1, 1.0},   {1, 333, 2, 1, 128, false, 0, 1.0},
                        {2, 130, 4, 4, 128, true, 2, 1.0},  {1, 1100, 2, 1, 128, true, 1, 2.0},
                        {1, 257, 8, 2, 64, false, 1, 3.0},  {1, 1, 2, 1, 64, true, 1, 1.0},
                        {3, 17, 2, 2, 128, true, 1, 1.0}};
  int bad = 0;
  for (const Case& c : cases) {
    if (small && c.T > 400) continue;
    const size_t nq = static_cast<size_t>(c.B) * c.T * c.H * c.D, nk = static_cast<size_t>(c.B) * c.T * c.Hkv * c.D;
    const size_t nm = static_cast<size_t>(c.B) * c.T * c.Hkv, nl = static_cast<size_t>(c.B) * c.H * c.T;
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));
    auto q = randn(nq, c.qs), k = randn(nk, 1), v = randn(nk, 1), go = randn(nq, 1);
    std::vector<double> mask(nm, 0.0);
    std::uniform_real_distribution<double> u(0, 1);
    for (auto& m : mask) m = c.mask == 1 ? std::log1p(-0.999 * u(rng)) : (c.mask == 2 && u(rng) < 0.3 ? -50000.0 : 0.0);
    std::vector<float> maskf(mask.begin(), mask.end());
    for (size_t i = 0; i < nm; ++i) mask[i] = maskf[i];
    auto qb = round_bf16(q), kb = round_bf16(k), vb = round_bf16(v), gob = round_bf16(go);
    bf16 *dq_ = upload(qb), *dk_ = upload(kb), *dv_ = upload(vb), *dgo = upload(gob);
    float* dm = upload(maskf);
    bf16* dout;
    float* dlse;
    DMC_CUDA_CHECK(cudaMalloc(&dout, nq * 2));
    DMC_CUDA_CHECK(cudaMalloc(&dlse, nl * 4));
    DMC_CUDA_CHECK(cudaMemset(dout, 0xFF, nq * 2));
    DMC_CUDA_CHECK(cudaMemset(dlse, 0xFF, nl * 4));
    const float* mp = c.mask ? dm : nullptr;
    dmc::cuda::dmc_attention_forward(dout, dlse, dq_, dk_, dv_, mp, c.B, c.T, c.H, c.Hkv, c.D, c.xctrl,
                                     static_cast<float>(scale));
    std::vector<double> out(nq), lse(nl);
    ref_forward(out, lse, q, k, v, c.mask ? &mask : nullptr, c, scale);
    std::vector<double> zq(nq, 0), zk(nk, 0), zv(nk, 0), zm(nm, 0);
    std::vector<bf16> zqb(nq, __float2bfloat16(0.f)), zkb(nk, __float2bfloat16(0.f));
    std::vector<float> zmf(nm, 0.f);
    bf16 *gq = upload(zqb), *gk = upload(zkb), *gv = upload(zkb);
    float* gm = upload(zmf);
    // written, not accumulated: NaN bytes in the outputs must not survive
    DMC_CUDA_CHECK(cudaMemset(gq, 0xFF, nq * 2));
    DMC_CUDA_CHECK(cudaMemset(gk, 0xFF, nk * 2));
    DMC_CUDA_CHECK(cudaMemset(gv, 0xFF, nk * 2));
    DMC_CUDA_CHECK(cudaMemset(gm, 0xFF, nm * 4));
    dmc::cuda::dmc_attention_backward(gq, gk, gv, c.mask ? gm : nullptr, dgo, dq_, dk_, dv_, mp, dout, dlse,
                                      c.B, c.T, c.H, c.Hkv, c.D, c.xctrl, static_cast<float>(scale),
                                      /*accumulate=*/false);
    ref_backward(zq, zk, zv, c.mask ? &zm : nullptr, go, q, k, v, c.mask ? &mask : nullptr, out, lse, c, scale);
    const double e[6] = {rel(download(dout, nq), out), rel(download(dlse, nl), lse),
                         rel(download(gq, nq), zq),    rel(download(gk, nk), zk),
                         rel(download(gv, nk), zv),    c.mask ? rel(download(gm, nm), zm) : 0.0};
    std::printf("B%d T%-5d H%d/%d D%-3d xctrl=%d mask=%d | out %.2e lse %.2e dq %.2e dk %.2e dv %.2e dmask %.2e\n",
                c.B, c.T, c.H, c.Hkv, c.D, c.xctrl, c.mask, e[0], e[1], e[2], e[3], e[4], e[5]);
    for (double x : e)
      if (!(x <= 1e-2)) ++bad;
    for (void* p : {(void*)dq_, (void*)dk_, (void*)dv_, (void*)dgo, (void*)dm, (void*)dout, (void*)dlse,
                    (void*)gq, (void*)gk, (void*)gv, (void*)gm})
      cudaFree(p);
  }
  std::printf("attention selfcheck: %s\n", bad ? "FAILED" : "ok");
  return bad ? 1 : 0;
}
