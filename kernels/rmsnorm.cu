// RMSNorm on the GPU (spec: kernels/rmsnorm.h), fp32 statistics.
// Vector path (C a multiple of 8 and at most 8192, every buffer 16-byte aligned): a team of
// threads per row, a warp for a training batch's many rows of up to 2048 channels, a block of 128
// threads otherwise (a decode step's few rows, or wider ones). Each thread issues all its 16-byte
// loads of the row before the first use and keeps them in registers, so a row is read once and a
// thread has up to 8 loads in flight (24 in the backward: dout, inp and, when it adds, dinp).
// Scalar path otherwise: a warp per row, one bf16 per lane.
// Backward: one kernel reads each row's dout and inp once for both dinp (by the row teams) and
// dweight's fp32 partial sums, one per block's fixed chunk of rows (scratch slot 1); column_sum
// then adds each column's partials in a fixed order, written or added: deterministic, no atomics.
#include <type_traits>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

// A block: 4 warp teams or one block-wide team. Small blocks, so that the backward's up to ~170
// registers a thread (and 32 KB of shared dweight sums) still let 3 blocks share an SM.
constexpr int kThreads = 128;
constexpr int kMaxWords = 8;     // 16-byte words per thread and tensor: C <= 8192 with a block
constexpr int kWarpMaxC = 32 * kMaxWords * 8;  // widest row of a warp team: 2048
constexpr int kManyRows = 2048;  // from here a warp per row still gives each of 132 SMs 15 rows

// Sum over a row's team: a warp, or the whole block.
template <int kTeam>
__device__ __forceinline__ float team_sum(float v) {
  if constexpr (kTeam == 32) return warp_sum(v);
  else return block_sum(v);
}

// Thread t of a team holds words k = 0 .. kWords-1 of the row, the 8 channels from
// (k · kTeam + t) · 8 on: consecutive threads read consecutive 16 bytes.
template <int kTeam>
__device__ __forceinline__ int word_col(int k) {
  return (k * kTeam + static_cast<int>(threadIdx.x) % kTeam) * 8;
}

template <int kTeam, int kWords>
__device__ __forceinline__ void load_row(uint4 (&v)[kWords], const bf16* row, int C) {
#pragma unroll
  for (int k = 0; k < kWords; ++k) {
    const int c = word_col<kTeam>(k);
    v[k] = c < C ? *reinterpret_cast<const uint4*>(row + c) : make_uint4(0, 0, 0, 0);
  }
}

template <int kTeam, int kWords>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_forward_vec(bf16* out, float* rstd, const bf16* inp, const bf16* weight, int N, int C,
                        float eps) {
  producer_done();
  const long row = static_cast<long>(blockIdx.x) * (kThreads / kTeam) + threadIdx.x / kTeam;
  if (row >= N) return;  // a whole team (a block team's row is always < N)
  uint4 x[kWords];
  load_row<kTeam>(x, inp + row * C, C);
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < kWords; ++k) {
    float v[8];
    unpack8(v, x[k]);  // zeros past C
#pragma unroll
    for (int i = 0; i < 8; ++i) ss += v[i] * v[i];
  }
  const float r = rsqrtf(team_sum<kTeam>(ss) / C + eps);
#pragma unroll
  for (int k = 0; k < kWords; ++k) {
    const int c = word_col<kTeam>(k);
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
  producer_done();
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

// The backward over block b's rows [b · rows, (b + 1) · rows) (the last block's may be fewer), team
// j of the block taking rows j, j + teams, ... of them, each read once (dout, inp and, when it
// adds, dinp):
//   dinp (+)= rstd · w · g - rstd^3 · (sum_j g_j w_j x_j) / C · x, with g = dout: added into dinp
//   when accumulate, else written (dinp not read). dinp may be null when kDweight (dweight alone).
//   kDweight: partial[b, c] = sum over the block's rows of dout[n, c] · inp[n, c] · rstd[n]; each
//   thread sums its channels over its team's rows in order, then team 0 adds the teams' sums in
//   team order: no atomics, the same order on any device. The sums live in shared memory: with
//   them in registers beside a 2048-channel row's 24 words, a warp team's thread spilled.
template <int kTeam, int kWords, bool kDweight>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_backward_vec(bf16* dinp, float* partial, const bf16* dout, const bf16* inp,
                         const bf16* weight, const float* rstd, int N, int C, int rows,
                         bool accumulate) {
  constexpr int kTeams = kThreads / kTeam;
  const int team = threadIdx.x / kTeam;
  const long first = static_cast<long>(blockIdx.x) * rows;
  const long end = min(first + rows, static_cast<long>(N));
  // Thread i's sums for its word k: dw[k][0][i] (channels 0-3) and dw[k][1][i] (4-7); a warp's
  // threads are 16 bytes apart, so no bank conflicts, and no thread touches another's until the
  // teams are added.
  __shared__ float4 dw[kDweight ? kWords : 1][2][kThreads];
  if constexpr (kDweight) {
#pragma unroll
    for (int k = 0; k < kWords; ++k)
      dw[k][0][threadIdx.x] = dw[k][1][threadIdx.x] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  for (long row = first + team; row < end; row += kTeams) {
    const long off = row * C;
    uint4 g[kWords], x[kWords], d[kWords];
    load_row<kTeam>(g, dout + off, C);
    load_row<kTeam>(x, inp + off, C);
    if (dinp && accumulate) {
      load_row<kTeam>(d, dinp + off, C);
    } else {
#pragma unroll
      for (int k = 0; k < kWords; ++k) d[k] = make_uint4(0, 0, 0, 0);  // bf16 zeros
    }
    const float r = rstd[row];
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < kWords; ++k) {
      const int c = word_col<kTeam>(k);
      if (c < C) {
        float gv[8], xv[8];
        unpack8(gv, g[k]);
        unpack8(xv, x[k]);
        if constexpr (kDweight) {
          float4& lo = dw[k][0][threadIdx.x];
          float4& hi = dw[k][1][threadIdx.x];
          lo = make_float4(lo.x + gv[0] * xv[0] * r, lo.y + gv[1] * xv[1] * r,
                           lo.z + gv[2] * xv[2] * r, lo.w + gv[3] * xv[3] * r);
          hi = make_float4(hi.x + gv[4] * xv[4] * r, hi.y + gv[5] * xv[5] * r,
                           hi.z + gv[6] * xv[6] * r, hi.w + gv[7] * xv[7] * r);
        }
        if (dinp) {
          float w[8];
          load8(w, weight + c);
#pragma unroll
          for (int i = 0; i < 8; ++i) dot += gv[i] * w[i] * xv[i];
        }
      }
    }
    if (!dinp) continue;  // the same for the whole block
    dot = team_sum<kTeam>(dot);
    const float kx = r * r * r * dot / C;
#pragma unroll
    for (int k = 0; k < kWords; ++k) {
      const int c = word_col<kTeam>(k);
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
  if constexpr (kDweight) {
    __syncthreads();
    if (team > 0) return;
    float* dst = partial + static_cast<long>(blockIdx.x) * C;
#pragma unroll
    for (int k = 0; k < kWords; ++k) {
      const int c = word_col<kTeam>(k);
      if (c < C) {
        float4 lo = dw[k][0][threadIdx.x], hi = dw[k][1][threadIdx.x];
        for (int j = 1; j < kTeams; ++j) {
          const float4 a = dw[k][0][j * kTeam + threadIdx.x], b = dw[k][1][j * kTeam + threadIdx.x];
          lo = make_float4(lo.x + a.x, lo.y + a.y, lo.z + a.z, lo.w + a.w);
          hi = make_float4(hi.x + b.x, hi.y + b.y, hi.z + b.z, hi.w + b.w);
        }
        *reinterpret_cast<float4*>(dst + c) = lo;
        *reinterpret_cast<float4*>(dst + c + 4) = hi;
      }
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

// The scalar path's dweight partials: partial[chunk, c] = sum over the chunk's rows (`rows` from
// chunk · rows on) of dout[n, c] · inp[n, c] · rstd[n], in row order.
__global__ void rmsnorm_backward_dweight_partial(float* partial, const bf16* dout, const bf16* inp,
                                                 const float* rstd, int N, int C, int rows) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const long first = static_cast<long>(blockIdx.y) * rows;
  const long end = min(first + rows, static_cast<long>(N));
  float acc = 0.f;
  for (long n = first; n < end; ++n) {
    const long off = n * C + c;
    acc += bf(dout[off]) * bf(inp[off]) * rstd[n];
  }
  partial[static_cast<long>(blockIdx.y) * C + c] = acc;
}

// out[c] (+)= the chunks' partials (out not read unless accumulate) in a fixed order: group j of
// a block's kSumGroups adds chunks j, j + kSumGroups, ... in order, then the groups are added in
// order. A block per 32 channels, so that the few thousand threads each make chunks / kSumGroups
// loads (8 in flight), not all of a channel's.
constexpr int kSumCols = 32, kSumGroups = 16;
__global__ void __launch_bounds__(kSumCols * kSumGroups)
    column_sum(float* out, const float* partial, int chunks, int C, bool accumulate) {
  __shared__ float group_sums[kSumGroups][kSumCols];
  const int c = blockIdx.x * kSumCols + threadIdx.x;
  float acc = 0.f;
  if (c < C) {
#pragma unroll 8
    for (int i = threadIdx.y; i < chunks; i += kSumGroups)
      acc += partial[static_cast<long>(i) * C + c];
  }
  group_sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y > 0 || c >= C) return;
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kSumGroups; ++j) sum += group_sums[j][threadIdx.x];
  out[c] = accumulate ? out[c] + sum : sum;
}

// Calls launch(team, words) with the row team of an N × C vector-path problem (a warp or a block
// of kThreads, as std::integral_constant) and the fewest words per thread, a power of 2, that
// hold a row: kernels are instantiated for 1, 2, 4 and kMaxWords words.
template <typename Launch>
void with_row_team(int N, int C, const Launch& launch) {
  auto pick_words = [&](auto team) {
    const int words = ceil_div(C, decltype(team)::value * 8);
    if (words <= 1) launch(team, std::integral_constant<int, 1>());
    else if (words <= 2) launch(team, std::integral_constant<int, 2>());
    else if (words <= 4) launch(team, std::integral_constant<int, 4>());
    else launch(team, std::integral_constant<int, kMaxWords>());
  };
  if (N >= kManyRows && C <= kWarpMaxC) pick_words(std::integral_constant<int, 32>());
  else pick_words(std::integral_constant<int, kThreads>());
}

// The vector path's conditions; anything else takes the scalar kernels.
bool vector_rows(int C, const void* a, const void* b, const void* c, const void* d = nullptr) {
  return C % 8 == 0 && C <= kThreads * kMaxWords * 8 && aligned16(a, b, c, d);
}

template <int kTeam>
int team_blocks(int N) {
  return ceil_div(N, kThreads / kTeam);
}

// The dweight partials come from at most kRowChunks chunks of ceil(N / kRowChunks) rows, a
// function of N alone, so that the summation order does not depend on the device. A block per
// chunk: 256 blocks give each of 132 SMs about two, eight warps streaming rows (three such blocks
// would fit); more chunks would only add partials for column_sum to read.
constexpr int kRowChunks = 256;

}  // namespace

void rmsnorm_forward(bf16* out, float* rstd, const bf16* inp, const bf16* weight, int N, int C,
                     float eps, cudaStream_t stream) {
  if (N <= 0) return;
  if (vector_rows(C, out, inp, weight)) {
    with_row_team(N, C, [&](auto team, auto words) {
      constexpr int kTeam = decltype(team)::value, kWords = decltype(words)::value;
      launch_dependent(rmsnorm_forward_vec<kTeam, kWords>, team_blocks<kTeam>(N), kThreads, 0,
                       stream, out, rstd, inp, weight, N, C, eps);
    });
  } else {
    launch_dependent(rmsnorm_forward_scalar, ceil_div(N, 8), 256, 0, stream, out, rstd, inp, weight,
                     N, C, eps);
  }
}

void rmsnorm_backward(bf16* dinp, float* dweight, const bf16* dout, const bf16* inp,
                      const bf16* weight, const float* rstd, int N, int C, bool accumulate_dinp,
                      bool accumulate_dweight, cudaStream_t stream) {
  if (N <= 0) {  // empty sums: a written dweight is zeros (dinp has no rows)
    if (dweight && !accumulate_dweight && C > 0)
      DMC_CUDA_CHECK(cudaMemsetAsync(dweight, 0, sizeof(float) * C, stream));
    return;
  }
  if (!dinp && !dweight) return;
  const int rows = ceil_div(N, kRowChunks), chunks = ceil_div(N, rows);
  float* partial =
      dweight ? static_cast<float*>(
                    scratch(kScratchRmsnormPartials, sizeof(float) * chunks * size_t(C)))
              : nullptr;
  if (vector_rows(C, dinp, dout, inp, weight)) {
    with_row_team(N, C, [&](auto team, auto words) {
      constexpr int kTeam = decltype(team)::value, kWords = decltype(words)::value;
      if (dweight)  // a block per row chunk
        rmsnorm_backward_vec<kTeam, kWords, true><<<chunks, kThreads, 0, stream>>>(
            dinp, partial, dout, inp, weight, rstd, N, C, rows, accumulate_dinp);
      else  // dinp alone: a row per team
        rmsnorm_backward_vec<kTeam, kWords, false><<<team_blocks<kTeam>(N), kThreads, 0, stream>>>(
            dinp, nullptr, dout, inp, weight, rstd, N, C, kThreads / kTeam, accumulate_dinp);
    });
    DMC_CUDA_CHECK_LAUNCH();
  } else {
    if (dinp) {
      rmsnorm_backward_dinp_scalar<<<ceil_div(N, 8), 256, 0, stream>>>(
          dinp, dout, inp, weight, rstd, N, C, accumulate_dinp);
      DMC_CUDA_CHECK_LAUNCH();
    }
    if (dweight) {
      rmsnorm_backward_dweight_partial<<<dim3(ceil_div(C, 128), chunks), 128, 0, stream>>>(
          partial, dout, inp, rstd, N, C, rows);
      DMC_CUDA_CHECK_LAUNCH();
    }
  }
  if (dweight) {
    column_sum<<<ceil_div(C, kSumCols), dim3(kSumCols, kSumGroups), 0, stream>>>(
        dweight, partial, chunks, C, accumulate_dweight);
    DMC_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace dmc::cuda
