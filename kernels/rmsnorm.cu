// RMSNorm on the GPU (spec: kernels/rmsnorm.h), fp32 statistics.
// Vector path (C a multiple of 8 and at most 8192, every buffer 16-byte aligned): a team of
// threads per row, a warp for a training batch's many rows of up to 2048 channels, a block of 128
// threads otherwise (a decode step's few rows, or wider ones). Each thread issues all its 16-byte
// loads of the row before the first use and keeps them in registers, so a row is read once and a
// thread has up to 8 loads in flight (24 in the backward: dout, inp and, when it adds, dinp).
// Scalar path otherwise: a warp per row, one bf16 per lane.
// Backward: dinp by the row teams; dweight deterministically in two passes (fixed row chunks
// into fp32 partials in scratch slot 1, then an in-order sum per column, written or added).
#include <type_traits>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

// A block: 4 warp teams or one block-wide team. Small blocks, so that the backward's ~160
// registers a thread still let 3 blocks share an SM.
constexpr int kThreads = 128;
constexpr int kMaxChunks = 8;    // 16-byte words per thread and tensor: C <= 8192 with a block
constexpr int kWarpMaxC = 32 * kMaxChunks * 8;  // widest row of a warp team: 2048
constexpr int kManyRows = 2048;  // from here a warp per row still gives each of 132 SMs 15 rows

// Sum over a row's team: a warp, or the whole block.
template <int kTeam>
__device__ __forceinline__ float team_sum(float v) {
  if constexpr (kTeam == 32) return warp_sum(v);
  else return block_sum(v);
}

// Thread t of a team holds words k = 0 .. kChunks-1 of the row, the 8 channels from
// (k · kTeam + t) · 8 on: consecutive threads read consecutive 16 bytes.
template <int kTeam>
__device__ __forceinline__ int chunk_col(int k) {
  return (k * kTeam + static_cast<int>(threadIdx.x) % kTeam) * 8;
}

template <int kTeam, int kChunks>
__device__ __forceinline__ void load_row(uint4 (&v)[kChunks], const bf16* row, int C) {
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int c = chunk_col<kTeam>(k);
    v[k] = c < C ? *reinterpret_cast<const uint4*>(row + c) : make_uint4(0, 0, 0, 0);
  }
}

template <int kTeam, int kChunks>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_forward_vec(bf16* out, float* rstd, const bf16* inp, const bf16* weight, int N, int C,
                        float eps) {
  const long row = static_cast<long>(blockIdx.x) * (kThreads / kTeam) + threadIdx.x / kTeam;
  if (row >= N) return;  // a whole team (a block team's row is always < N)
  uint4 x[kChunks];
  load_row<kTeam>(x, inp + row * C, C);
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    float v[8];
    unpack8(v, x[k]);  // zeros past C
#pragma unroll
    for (int i = 0; i < 8; ++i) ss += v[i] * v[i];
  }
  const float r = rsqrtf(team_sum<kTeam>(ss) / C + eps);
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int c = chunk_col<kTeam>(k);
    if (c < C) {
      float v[8], w[8];
      unpack8(v, x[k]);
      load8(w, weight + c);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = v[i] * r * w[i];
      store8(out + row * C + c, v);
    }
  }
  if (threadIdx.x % kTeam == 0 && rstd) rstd[row] = r;
}

__global__ void rmsnorm_forward_scalar(bf16* out, float* rstd, const bf16* inp, const bf16* weight,
                                       int N, int C, float eps) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= N) return;
  const bf16* x = inp + static_cast<long>(row) * C;
  bf16* o = out + static_cast<long>(row) * C;
  float ss = 0.f;
  for (int c = lane; c < C; c += 32) ss += bf(x[c]) * bf(x[c]);
  const float r = rsqrtf(warp_sum(ss) / C + eps);
  for (int c = lane; c < C; c += 32) o[c] = tobf(bf(x[c]) * r * bf(weight[c]));
  if (lane == 0 && rstd) rstd[row] = r;
}

// dinp (+)= rstd · w · g - rstd^3 · (sum_j g_j w_j x_j) / C · x, with g = dout: added into dinp
// when accumulate, else written (dinp not read).
template <int kTeam, int kChunks>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_backward_dinp_vec(bf16* dinp, const bf16* dout, const bf16* inp, const bf16* weight,
                              const float* rstd, int N, int C, bool accumulate) {
  const long row = static_cast<long>(blockIdx.x) * (kThreads / kTeam) + threadIdx.x / kTeam;
  if (row >= N) return;
  const long off = row * C;
  uint4 g[kChunks], x[kChunks], d[kChunks];
  load_row<kTeam>(g, dout + off, C);
  load_row<kTeam>(x, inp + off, C);
  if (accumulate) {
    load_row<kTeam>(d, dinp + off, C);
  } else {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) d[k] = make_uint4(0, 0, 0, 0);  // bf16 zeros
  }
  const float r = rstd[row];
  float dot = 0.f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int c = chunk_col<kTeam>(k);
    if (c < C) {
      float gv[8], xv[8], w[8];
      unpack8(gv, g[k]);
      unpack8(xv, x[k]);
      load8(w, weight + c);
#pragma unroll
      for (int i = 0; i < 8; ++i) dot += gv[i] * w[i] * xv[i];
    }
  }
  dot = team_sum<kTeam>(dot);
  const float kx = r * r * r * dot / C;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int c = chunk_col<kTeam>(k);
    if (c < C) {
      float gv[8], xv[8], dv[8], w[8];
      unpack8(gv, g[k]);
      unpack8(xv, x[k]);
      unpack8(dv, d[k]);
      load8(w, weight + c);
#pragma unroll
      for (int i = 0; i < 8; ++i) dv[i] += r * w[i] * gv[i] - kx * xv[i];
      store8(dinp + off + c, dv);
    }
  }
}

__global__ void rmsnorm_backward_dinp_scalar(bf16* dinp, const bf16* dout, const bf16* inp,
                                             const bf16* weight, const float* rstd, int N, int C,
                                             bool accumulate) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= N) return;
  const long off = static_cast<long>(row) * C;
  float dot = 0.f;
  for (int c = lane; c < C; c += 32) dot += bf(dout[off + c]) * bf(weight[c]) * bf(inp[off + c]);
  dot = warp_sum(dot);
  const float r = rstd[row];
  const float k = r * r * r * dot / C;
  for (int c = lane; c < C; c += 32) {
    const float g = r * bf(weight[c]) * bf(dout[off + c]) - k * bf(inp[off + c]);
    dinp[off + c] = tobf(accumulate ? bf(dinp[off + c]) + g : g);
  }
}

// partial[chunk, c] = sum over the chunk's rows of dout[n, c] · inp[n, c] · rstd[n];
// kVec: each thread owns 8 consecutive columns (16-byte loads, 8 rows' worth in flight).
template <bool kVec>
__global__ void rmsnorm_backward_dweight_partial(float* partial, const bf16* dout, const bf16* inp,
                                                 const float* rstd, int N, int C, int rows_per) {
  const int c = (blockIdx.x * blockDim.x + threadIdx.x) * (kVec ? 8 : 1);
  if (c >= C) return;
  const int n0 = blockIdx.y * rows_per, n1 = min(N, n0 + rows_per);
  float* dst = partial + static_cast<long>(blockIdx.y) * C + c;
  if (kVec) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll 8
    for (int n = n0; n < n1; ++n) {
      const long off = static_cast<long>(n) * C + c;
      float g[8], x[8];
      load8(g, dout + off);
      load8(x, inp + off);
      const float r = rstd[n];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += g[i] * x[i] * r;
    }
    *reinterpret_cast<float4*>(dst) = make_float4(acc[0], acc[1], acc[2], acc[3]);
    *reinterpret_cast<float4*>(dst + 4) = make_float4(acc[4], acc[5], acc[6], acc[7]);
  } else {
    float acc = 0.f;
    for (int n = n0; n < n1; ++n) {
      const long off = static_cast<long>(n) * C + c;
      acc += bf(dout[off]) * bf(inp[off]) * rstd[n];
    }
    *dst = acc;
  }
}

// out[c] (+)= the chunks' partials in chunk order (out not read unless accumulate); 16 loads in
// flight (a few thousand threads read 128 chunks at 8192 rows, one L2 round trip each without
// the unrolling).
__global__ void column_sum(float* out, const float* partial, int chunks, int C, bool accumulate) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float acc = 0.f;
#pragma unroll 16
  for (int i = 0; i < chunks; ++i) acc += partial[static_cast<long>(i) * C + c];
  out[c] = accumulate ? out[c] + acc : acc;
}

// Calls launch(team, chunks) with the row team of an N × C vector-path problem (a warp or a block
// of kThreads, as std::integral_constant) and the fewest words per thread, a power of 2, that
// hold a row: kernels are instantiated for 1, 2, 4 and kMaxChunks words.
template <typename Launch>
void with_row_team(int N, int C, const Launch& launch) {
  auto pick_chunks = [&](auto team) {
    const int words = ceil_div(C, decltype(team)::value * 8);
    if (words <= 1) launch(team, std::integral_constant<int, 1>());
    else if (words <= 2) launch(team, std::integral_constant<int, 2>());
    else if (words <= 4) launch(team, std::integral_constant<int, 4>());
    else launch(team, std::integral_constant<int, kMaxChunks>());
  };
  if (N >= kManyRows && C <= kWarpMaxC) pick_chunks(std::integral_constant<int, 32>());
  else pick_chunks(std::integral_constant<int, kThreads>());
}

// The vector path's conditions; anything else takes the scalar kernels.
bool vector_rows(int C, const void* a, const void* b, const void* c, const void* d = nullptr) {
  return C % 8 == 0 && C <= kThreads * kMaxChunks * 8 && aligned16(a, b, c, d);
}

template <int kTeam>
int team_blocks(int N) {
  return ceil_div(N, kThreads / kTeam);
}

}  // namespace

void rmsnorm_forward(bf16* out, float* rstd, const bf16* inp, const bf16* weight, int N, int C,
                     float eps, cudaStream_t stream) {
  if (N <= 0) return;
  if (vector_rows(C, out, inp, weight)) {
    with_row_team(N, C, [&](auto team, auto chunks) {
      constexpr int kTeam = decltype(team)::value, kChunks = decltype(chunks)::value;
      rmsnorm_forward_vec<kTeam, kChunks><<<team_blocks<kTeam>(N), kThreads, 0, stream>>>(
          out, rstd, inp, weight, N, C, eps);
    });
  } else {
    rmsnorm_forward_scalar<<<ceil_div(N, 8), 256, 0, stream>>>(out, rstd, inp, weight, N, C, eps);
  }
  DMC_CUDA_CHECK_LAUNCH();
}

void rmsnorm_backward(bf16* dinp, float* dweight, const bf16* dout, const bf16* inp,
                      const bf16* weight, const float* rstd, int N, int C, bool accumulate,
                      cudaStream_t stream) {
  if (N <= 0) {  // empty sums: a written dweight is zeros (dinp has no rows)
    if (dweight && !accumulate && C > 0)
      DMC_CUDA_CHECK(cudaMemsetAsync(dweight, 0, sizeof(float) * C, stream));
    return;
  }
  if (dinp) {
    if (vector_rows(C, dinp, dout, inp, weight)) {
      with_row_team(N, C, [&](auto team, auto chunks) {
        constexpr int kTeam = decltype(team)::value, kChunks = decltype(chunks)::value;
        rmsnorm_backward_dinp_vec<kTeam, kChunks><<<team_blocks<kTeam>(N), kThreads, 0, stream>>>(
            dinp, dout, inp, weight, rstd, N, C, accumulate);
      });
    } else {
      rmsnorm_backward_dinp_scalar<<<ceil_div(N, 8), 256, 0, stream>>>(dinp, dout, inp, weight,
                                                                       rstd, N, C, accumulate);
    }
    DMC_CUDA_CHECK_LAUNCH();
  }
  if (dweight) {
    const int rows_per = 64;  // fixed: the summation order does not depend on the device
    const int chunks = ceil_div(N, rows_per);
    float* partial = static_cast<float*>(scratch(1, sizeof(float) * chunks * static_cast<size_t>(C)));
    if (C % 8 == 0 && aligned16(dout, inp))
      rmsnorm_backward_dweight_partial<true><<<dim3(ceil_div(C / 8, 128), chunks), 128, 0, stream>>>(
          partial, dout, inp, rstd, N, C, rows_per);
    else
      rmsnorm_backward_dweight_partial<false><<<dim3(ceil_div(C, 128), chunks), 128, 0, stream>>>(
          partial, dout, inp, rstd, N, C, rows_per);
    DMC_CUDA_CHECK_LAUNCH();
    column_sum<<<ceil_div(C, 128), 128, 0, stream>>>(dweight, partial, chunks, C, accumulate);
    DMC_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace dmc::cuda
