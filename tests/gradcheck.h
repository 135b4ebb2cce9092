// Finite-difference gradient checking for the CPU reference kernels and the whole model.
// Everything runs in double precision on tiny shapes: central differences with h = 1e-6 give
// about 1e-9 relative truncation error, so a mismatch above 1e-6 is a real bug, not noise.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <vector>

namespace dmc::testing {

inline std::vector<double> random_vector(size_t n, std::mt19937_64& rng, double lo = -1.0,
                                         double hi = 1.0) {
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Compares analytic[i] with the central difference of loss() w.r.t. x[i] for the listed indices
// (all of x when indices is empty). loss() must read x by reference.
inline void expect_gradient_matches(const std::function<double()>& loss, std::vector<double>& x,
                                    const std::vector<double>& analytic, const char* what,
                                    std::vector<size_t> indices = {}, double h = 1e-6,
                                    double tol = 1e-6) {
  ASSERT_EQ(x.size(), analytic.size()) << what;
  if (indices.empty())
    for (size_t i = 0; i < x.size(); ++i) indices.push_back(i);
  double max_abs = 0;
  for (size_t i : indices) max_abs = std::max(max_abs, std::fabs(analytic[i]));
  ASSERT_GT(max_abs, 0.0) << what << ": analytic gradient is all zeros, the check would be vacuous";
  for (size_t i : indices) {
    const double saved = x[i];
    x[i] = saved + h;
    const double up = loss();
    x[i] = saved - h;
    const double down = loss();
    x[i] = saved;
    const double numeric = (up - down) / (2 * h);
    const double err = std::fabs(numeric - analytic[i]) / std::max(1.0, std::fabs(numeric));
    EXPECT_LT(err, tol) << what << "[" << i << "]: analytic " << analytic[i] << " numeric "
                        << numeric;
  }
}

// sum_i w[i] · y[i]: contracting an output with fixed random weights turns any op into a scalar
// loss whose gradient w.r.t. the output is w.
inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Gradient buffer pre-filled with random values: a backward call adds into it and delta() returns
// what was added, so every gradient check also proves the kernel accumulates (+=) rather than
// overwrites.
class AccumulatedGrad {
 public:
  AccumulatedGrad(size_t n, std::mt19937_64& rng) : start_(random_vector(n, rng)), g_(start_) {}
  double* data() { return g_.data(); }
  std::vector<double> delta() const {
    std::vector<double> d(g_.size());
    for (size_t i = 0; i < g_.size(); ++i) d[i] = g_[i] - start_[i];
    return d;
  }

 private:
  std::vector<double> start_, g_;
};

// |a[i] - b[i]| <= tol · max(1, |b[i]|) for every i.
template <typename A, typename B>
void expect_all_near(const A& a, const B& b, double tol, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    EXPECT_LE(std::fabs(x - y), tol * std::max(1.0, std::fabs(y)))
        << what << "[" << i << "]: " << x << " vs " << y;
  }
}

// The two modes of a backward's gradients: run(outs, accumulate) fills the buffers
// outs[i] (sizes[i] values each; a null entry stands for an output left out). Written
// (accumulate false) into buffers poisoned with NaN, so a kernel that reads them or skips an
// element fails, they must equal what is added (true) onto random values.
template <typename Run>
void expect_written_equals_added(const std::vector<size_t>& sizes, std::mt19937_64& rng,
                                 const Run& run, const char* what) {
  std::vector<std::vector<double>> written;
  std::vector<AccumulatedGrad> added;
  std::vector<double*> w, a;
  for (size_t n : sizes) {
    written.emplace_back(n, std::nan(""));
    added.emplace_back(n, rng);
  }
  for (size_t i = 0; i < sizes.size(); ++i) {
    w.push_back(sizes[i] ? written[i].data() : nullptr);
    a.push_back(sizes[i] ? added[i].data() : nullptr);
  }
  run(w.data(), false);
  run(a.data(), true);
  for (size_t i = 0; i < sizes.size(); ++i)
    expect_all_near(written[i], added[i].delta(), 1e-12, what);
}

}  // namespace dmc::testing
