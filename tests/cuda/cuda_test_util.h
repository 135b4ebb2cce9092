// Helpers of the GPU tests: every CUDA kernel is compared with its CPU reference (the template
// instantiated for double) on the same random inputs; bf16 inputs are rounded first and the
// rounded values fed to the reference, so the comparison measures the kernel, not the rounding of
// its inputs. Without a CUDA device every test calls GTEST_SKIP (reported as skipped).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda_ops.h"

#define DMC_REQUIRE_GPU()                                                  \
  do {                                                                     \
    if (!::dmc::cuda::device_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)


namespace dmc::cuda_test {

using bf16 = __nv_bfloat16;

inline std::mt19937_64& rng() {
  static std::mt19937_64 r(std::random_device{}());  // fresh inputs on every run
  return r;
}

inline std::vector<double> randn(size_t n, double stddev = 1.0, double mean = 0.0) {
  std::normal_distribution<double> d(mean, stddev);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng());
  return v;
}
inline std::vector<double> randu(size_t n, double lo, double hi) {
  std::uniform_real_distribution<double> d(lo, hi);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng());
  return v;
}

// The starting values of a backward's gradient: random values to add onto
// (accumulate), or NaN, which a kernel that writes (accumulate false) must never read.
inline std::vector<double> grad_start(size_t n, bool accumulate, double stddev = 1.0) {
  return accumulate ? randn(n, stddev) : std::vector<double>(n, std::nan(""));
}
// A check's name with the mode: "what (+=)" or "what (=)".
inline std::string with_mode(const std::string& what, bool accumulate) {
  return what + (accumulate ? " (+=)" : " (=)");
}

// Round to bf16 in place (so the reference sees what the kernel sees) and return the bf16 copy.
inline std::vector<bf16> to_bf16(std::vector<double>& v) {
  std::vector<bf16> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    out[i] = __float2bfloat16(static_cast<float>(v[i]));
    v[i] = static_cast<double>(__bfloat162float(out[i]));
  }
  return out;
}
inline std::vector<float> to_f32(std::vector<double>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    out[i] = static_cast<float>(v[i]);
    v[i] = out[i];
  }
  return out;
}

// A device buffer owning n elements of T.
template <typename T>
struct DevBuf {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) {
    if (cudaMalloc(reinterpret_cast<void**>(&ptr), sizeof(T) * (n ? n : 1)) != cudaSuccess) {
      ADD_FAILURE() << "cudaMalloc of " << n << " elements failed";
      ptr = nullptr;
    }
  }
  explicit DevBuf(const std::vector<T>& host) : DevBuf(host.size()) { upload(host); }
  ~DevBuf() { cudaFree(ptr); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  void upload(const std::vector<T>& host) {
    EXPECT_EQ(cudaMemcpy(ptr, host.data(), sizeof(T) * n, cudaMemcpyHostToDevice), cudaSuccess);
  }
  // 0xFF bytes: NaN in bf16, fp32 and fp64, so any element the kernel fails to write shows up.
  void poison() { EXPECT_EQ(cudaMemset(ptr, 0xFF, sizeof(T) * n), cudaSuccess); }
  std::vector<T> download() const {
    std::vector<T> host(n);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess) << "kernel failed";
    EXPECT_EQ(cudaMemcpy(host.data(), ptr, sizeof(T) * n, cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }
  operator T*() const { return ptr; }
};

inline std::vector<double> as_double(const std::vector<bf16>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(__bfloat162float(v[i]));
  return out;
}
inline std::vector<double> as_double(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}
inline std::vector<double> as_double(const std::vector<double>& v) { return v; }

// Relative error ||out - ref|| / ||ref||; NaN (an unwritten or broken element) gives +inf.
inline double rel_error(const std::vector<double>& out, const std::vector<double>& ref) {
  if (out.size() != ref.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) return INFINITY;
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  if (den == 0) return std::sqrt(num);
  return std::sqrt(num / den);
}

// Records and checks one comparison; the figure is printed so the device log carries it.
template <typename Dev>
inline void expect_close(const char* what, const std::vector<Dev>& out,
                         const std::vector<double>& ref, double tol) {
  const double err = rel_error(as_double(out), ref);
  std::printf("[ error ] %-48s rel %.3e (tol %.0e, n=%zu)\n", what, err, tol, ref.size());
  std::fflush(stdout);
  ::testing::Test::RecordProperty(what, std::to_string(err));
  EXPECT_LE(err, tol) << what;
}
template <typename Dev>
inline void expect_close(const std::string& what, const std::vector<Dev>& out,
                         const std::vector<double>& ref, double tol) {
  expect_close(what.c_str(), out, ref, tol);
}

// A paged decode attention's weights (B rows of H query heads, G to a KV head, `stride` apart)
// against the reference's: compared over each head's slots (slots[b · Hkv + h] of KV head h),
// and nothing written past them into the buffer poisoned with 0xFF bytes.
inline void expect_probs(const std::string& what, const std::vector<float>& probs,
                         const std::vector<double>& ref, const std::vector<int>& slots, int B,
                         int H, int G, int stride, double tol) {
  std::vector<double> got, want;
  long touched = 0;
  for (int b = 0; b < B; ++b)
    for (int g = 0; g < H; ++g) {
      const int n = slots[b * (H / G) + g / G];
      const size_t base = (static_cast<size_t>(b) * H + g) * stride;
      for (int i = 0; i < stride; ++i) {
        if (i < n) {
          got.push_back(probs[base + i]);
          want.push_back(ref[base + i]);
        } else {
          uint32_t bits;
          std::memcpy(&bits, &probs[base + i], sizeof bits);
          touched += bits != 0xFFFFFFFFu;
        }
      }
    }
  expect_close(what.c_str(), got, want, tol);
  EXPECT_EQ(touched, 0) << what << ": written past a head's slots";
}

// Whether two arrays hold the same bits (bf16 has no host ==; NaN equals itself here).
template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(T) * a.size()) == 0;
}

// A decode attention run again on the same inputs (launch(out, probs) into fresh buffers) gives
// bit-identical outputs and weights: fixed chunks, a fixed reduction order, no races.
template <typename Launch>
void expect_rerun_identical(const std::string& what, const Launch& launch,
                            const std::vector<bf16>& out, const std::vector<float>& probs) {
  DevBuf<bf16> out2(out.size());
  DevBuf<float> probs2(probs.size());
  out2.poison();
  probs2.poison();
  launch(out2.ptr, probs2.ptr);
  const std::vector<bf16> again = out2.download();
  EXPECT_EQ(std::memcmp(out.data(), again.data(), sizeof(bf16) * out.size()), 0)
      << what << ": two runs differ";
  const std::vector<float> probs_again = probs2.download();  // bits: unwritten ones are NaN
  EXPECT_EQ(std::memcmp(probs.data(), probs_again.data(), sizeof(float) * probs.size()), 0)
      << what << ": two runs' weights differ";
}

// Per head of a settling cache, settled pages (0..max_pages) and residual slots (0..residual),
// at least one slot a head; the first four heads the edge cases (full, one residual slot, one
// page, a full residual).
inline void random_settled_lengths(int heads, int max_pages, int residual,
                                   std::vector<int>* pages_of, std::vector<int>* r_len) {
  pages_of->resize(heads);
  r_len->resize(heads);
  std::uniform_int_distribution<int> any_pages(0, max_pages), any_residual(0, residual);
  for (int h = 0; h < heads; ++h) {
    (*pages_of)[h] = any_pages(rng());
    (*r_len)[h] = any_residual(rng());
    if ((*pages_of)[h] == 0 && (*r_len)[h] == 0) (*r_len)[h] = 1;
  }
  const int edge[4][2] = {{max_pages, residual}, {0, 1}, {1, 0}, {0, residual}};
  for (int h = 0; h < std::min(heads, 4); ++h) {
    (*pages_of)[h] = edge[h][0];
    (*r_len)[h] = edge[h][1];
  }
}

// 0..n-1 in random order.
inline std::vector<int32_t> shuffled_ids(int n) {
  std::vector<int32_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng());
  return ids;
}

// A settling cache's page tables [heads, max_pages]: head h's pages_of[h] pages taken in
// shuffled order from a pool of those plus `spare` unused pages (Σ pages_of + spare in all),
// every unused entry naming a spare one; fill(page) writes each used page, in head order.
template <typename Fill>
void shuffled_page_tables(const std::vector<int>& pages_of, int max_pages, int spare,
                         std::vector<int32_t>* table, Fill fill) {
  const int npages = std::accumulate(pages_of.begin(), pages_of.end(), 0) + spare;
  const std::vector<int32_t> perm = shuffled_ids(npages);
  table->assign(pages_of.size() * max_pages, perm[npages - 1]);
  int next = 0;
  for (size_t h = 0; h < pages_of.size(); ++h)
    for (int pg = 0; pg < pages_of[h]; ++pg) {
      const int32_t page = perm[next++];
      (*table)[h * max_pages + pg] = page;
      fill(page);
    }
}

// METHOD.md: bf16 operands land between 1e-3 and 1e-2; fp32 arithmetic far under 1e-3.
constexpr double kBf16Tol = 1e-2;
constexpr double kF32Tol = 1e-5;

}  // namespace dmc::cuda_test
