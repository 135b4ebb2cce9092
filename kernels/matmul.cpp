// Linear layer, nn.Linear layout (spec: kernels/matmul.h):
//   out[n, o]     = sum_i inp[n, i] · weight[o, i]             (+ residual[n, o], in the same sum)
//   dinp[n, i]   += sum_o dout[n, o] · weight[o, i]   (or =, without accumulate)
//   dweight[o, i] += sum_n dout[n, o] · inp[n, i]      (likewise)
//
// This is the hot loop of CPU training, so unlike the other references it is arranged for speed,
// while each output element is still one plain sum accumulated in double:
//   - forward: both operands are read along their contiguous IC axis, so every output is a dot
//     product. The dot keeps 8 independent partial sums (a fixed order, so results are
//     deterministic), which lets the compiler vectorise it without -ffast-math; 4 input rows are
//     processed together so each weight row is loaded once for all four.
//   - backward: both products are written as "axpy" updates of a contiguous double accumulator
//     row (dinp row += d · weight row; dweight row += d · inp row), which vectorises directly.
//     Small blocks of rows share each streamed operand row, for cache reuse.
//   - rows are split across threads with OpenMP when it is enabled and the product is large;
//     every output element is written by exactly one thread, so the result does not depend on
//     the thread count.
//   - on x86-64 with GCC the hot functions are also compiled for AVX2/FMA and AVX-512 and picked
//     at load time (target_clones), since the project builds for the baseline x86-64 ISA: 2-3x
//     faster. (FMA contraction makes the last bits depend on the CPU's clone.)
#include "kernels/matmul.h"

#include <algorithm>
#include <vector>

// x86-64-v3 = AVX2 + FMA (Haswell, Zen and later), x86-64-v4 adds AVX-512; the loader picks the
// best clone the CPU supports. ("arch=haswell" would not do: its resolver tests the CPU model, so
// AMD CPUs would get the baseline.)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__)
#define DMC_MATMUL_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DMC_MATMUL_CLONES
#endif

namespace dmc::kernels {
namespace {

// Below this many multiply-adds a call runs on one thread: thread start-up would dominate.
constexpr long kParallelWork = 1L << 18;

constexpr int kLanes = 8;  // independent partial sums per dot product
constexpr int kRows = 4;   // input rows that share one pass over a weight row

// out[r, o] for the rows r0..r0+nr-1 (nr <= kRows) and every o, plus residual[r, o] when there is
// one (read just before out[r, o] is written, so the two may be one buffer).
template <typename T>
DMC_MATMUL_CLONES void forward_rows(T* out, const T* inp, const T* weight, const T* residual,
                                    int r0, int nr, int IC, int OC) {
  const T* a[kRows];
  for (int r = 0; r < kRows; ++r) a[r] = inp + static_cast<long>(r0 + std::min(r, nr - 1)) * IC;
  const int main_end = IC - IC % kLanes;
  for (int o = 0; o < OC; ++o) {
    const T* w = weight + static_cast<long>(o) * IC;
    double acc[kRows][kLanes] = {};
    for (int i = 0; i < main_end; i += kLanes)
      for (int r = 0; r < kRows; ++r)
        for (int l = 0; l < kLanes; ++l)
          acc[r][l] += static_cast<double>(a[r][i + l]) * static_cast<double>(w[i + l]);
    for (int r = 0; r < nr; ++r) {
      double sum = 0;
      for (int l = 0; l < kLanes; ++l) sum += acc[r][l];
      for (int i = main_end; i < IC; ++i)
        sum += static_cast<double>(a[r][i]) * static_cast<double>(w[i]);
      const long at = static_cast<long>(r0 + r) * OC + o;
      if (residual) sum += static_cast<double>(residual[at]);
      out[at] = static_cast<T>(sum);
    }
  }
}

// dinp[r, :] (+)= sum_o dout[r, o] · weight[o, :] for rows r0..r0+nr-1 (nr <= kRows).
template <typename T>
DMC_MATMUL_CLONES void backward_inp_rows(T* dinp, const T* dout, const T* weight, int r0, int nr,
                                         int IC, int OC, bool accumulate,
                                         double* acc /* [kRows, IC] */) {
  std::fill(acc, acc + static_cast<long>(kRows) * IC, 0.0);
  for (int o = 0; o < OC; ++o) {
    const T* w = weight + static_cast<long>(o) * IC;
    for (int r = 0; r < nr; ++r) {
      const double d = dout[static_cast<long>(r0 + r) * OC + o];
      double* ar = acc + static_cast<long>(r) * IC;
      for (int i = 0; i < IC; ++i) ar[i] += d * static_cast<double>(w[i]);
    }
  }
  for (int r = 0; r < nr; ++r) {
    T* dr = dinp + static_cast<long>(r0 + r) * IC;
    const double* ar = acc + static_cast<long>(r) * IC;
    if (accumulate)
      for (int i = 0; i < IC; ++i) dr[i] = static_cast<T>(dr[i] + ar[i]);
    else
      for (int i = 0; i < IC; ++i) dr[i] = static_cast<T>(ar[i]);
  }
}

// dweight[o, :] (+)= sum_n dout[n, o] · inp[n, :] for weight rows o0..o0+no-1.
template <typename T>
DMC_MATMUL_CLONES void backward_weight_rows(T* dweight, const T* dout, const T* inp, int o0, int no,
                                            int N, int IC, int OC, bool accumulate,
                                            double* acc /* [no, IC] */) {
  std::fill(acc, acc + static_cast<long>(no) * IC, 0.0);
  for (int n = 0; n < N; ++n) {
    const T* x = inp + static_cast<long>(n) * IC;
    const T* dn = dout + static_cast<long>(n) * OC + o0;
    for (int o = 0; o < no; ++o) {
      const double d = dn[o];
      double* ao = acc + static_cast<long>(o) * IC;
      for (int i = 0; i < IC; ++i) ao[i] += d * static_cast<double>(x[i]);
    }
  }
  for (int o = 0; o < no; ++o) {
    T* dw = dweight + static_cast<long>(o0 + o) * IC;
    const double* ao = acc + static_cast<long>(o) * IC;
    if (accumulate)
      for (int i = 0; i < IC; ++i) dw[i] = static_cast<T>(dw[i] + ao[i]);
    else
      for (int i = 0; i < IC; ++i) dw[i] = static_cast<T>(ao[i]);
  }
}

// matmul_forward, and matmul_forward_residual when residual is not null.
template <typename T>
void forward(T* out, const T* inp, const T* weight, const T* residual, int N, int IC, int OC) {
  if (N <= 0 || OC <= 0) return;
  const int blocks = (N + kRows - 1) / kRows;
  const bool parallel = static_cast<long>(N) * IC * OC >= kParallelWork;
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int blk = 0; blk < blocks; ++blk) {
    const int r0 = blk * kRows;
    forward_rows(out, inp, weight, residual, r0, std::min(kRows, N - r0), IC, OC);
  }
}

}  // namespace

template <typename T>
void matmul_forward(T* out, const T* inp, const T* weight, int N, int IC, int OC) {
  forward<T>(out, inp, weight, nullptr, N, IC, OC);
}

template <typename T>
void matmul_forward_residual(T* out, const T* inp, const T* weight, const T* residual, int N,
                             int IC, int OC) {
  forward(out, inp, weight, residual, N, IC, OC);
}

template <typename T>
void matmul_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight, int N,
                     int IC, int OC, bool accumulate) {
  if (N < 0 || IC <= 0) return;  // N 0 or OC 0 still write zeros (empty sums) when not accumulating
  const bool parallel = static_cast<long>(N) * IC * OC >= kParallelWork;
  (void)parallel;
  if (dinp) {
    const int blocks = (N + kRows - 1) / kRows;
#if defined(_OPENMP)
#pragma omp parallel if (parallel)
#endif
    {
      std::vector<double> acc(static_cast<size_t>(kRows) * IC);
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
      for (int blk = 0; blk < blocks; ++blk) {
        const int r0 = blk * kRows;
        backward_inp_rows(dinp, dout, weight, r0, std::min(kRows, N - r0), IC, OC, accumulate,
                          acc.data());
      }
    }
  }
  if (dweight) {
    // Blocks of weight rows small enough that their double accumulators stay in L1/L2 while
    // every input row streams past once.
    const int rows_per_block = std::max(1, std::min(16, (32 * 1024) / (8 * IC)));
    const int blocks = (OC + rows_per_block - 1) / rows_per_block;
#if defined(_OPENMP)
#pragma omp parallel if (parallel)
#endif
    {
      std::vector<double> acc(static_cast<size_t>(rows_per_block) * IC);
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
      for (int blk = 0; blk < blocks; ++blk) {
        const int o0 = blk * rows_per_block;
        backward_weight_rows(dweight, dout, inp, o0, std::min(rows_per_block, OC - o0), N, IC, OC,
                             accumulate, acc.data());
      }
    }
  }
}

template void matmul_forward<float>(float*, const float*, const float*, int, int, int);
template void matmul_forward<double>(double*, const double*, const double*, int, int, int);
template void matmul_forward_residual<float>(float*, const float*, const float*, const float*, int,
                                             int, int);
template void matmul_forward_residual<double>(double*, const double*, const double*, const double*,
                                              int, int, int);
template void matmul_backward<float>(float*, float*, const float*, const float*, const float*, int,
                                     int, int, bool);
template void matmul_backward<double>(double*, double*, const double*, const double*, const double*,
                                      int, int, int, bool);

}  // namespace dmc::kernels
