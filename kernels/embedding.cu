// Token embedding on the GPU (spec: kernels/embedding.h).
// Forward: one 16-byte vector per thread, a copy of the token's row (zeros for a token of another
// tensor-parallel rank's vocabulary rows); one bf16 per thread where C is not a multiple of 8 or a
// buffer not 16-byte aligned.
// Backward, deterministic without atomics: the token ids are radix-sorted (stable, with their
// positions), and one warp per run of equal tokens sums that run's dout rows in position order
// into fp32 dwte. Scratch slot 0 holds the sort buffers.
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

// The row of `token` in this rank's part of the table, or -1 when another rank holds it.
__device__ __forceinline__ long local_row(int32_t token, int vocab_begin, int vocab_rows) {
  const long row = static_cast<long>(token) - vocab_begin;
  return row >= 0 && row < vocab_rows ? row : -1;
}

__global__ void embedding_forward_kernel(bf16* out, const int32_t* tokens, const bf16* wte, int N,
                                         int C, int vocab_begin, int vocab_rows) {
  producer_done();
  const long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int vecs = C / 8;
  if (idx >= static_cast<long>(N) * vecs) return;
  const int n = static_cast<int>(idx / vecs), c = static_cast<int>(idx % vecs) * 8;
  const long row = local_row(tokens[n], vocab_begin, vocab_rows);
  const uint4 v = row >= 0 ? *reinterpret_cast<const uint4*>(wte + row * C + c)
                           : make_uint4(0, 0, 0, 0);  // bf16 zeros
  *reinterpret_cast<uint4*>(out + static_cast<long>(n) * C + c) = v;
}

__global__ void embedding_forward_scalar(bf16* out, const int32_t* tokens, const bf16* wte, int N,
                                         int C, int vocab_begin, int vocab_rows) {
  producer_done();
  const long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long>(N) * C) return;
  const int n = static_cast<int>(idx / C), c = static_cast<int>(idx % C);
  const long row = local_row(tokens[n], vocab_begin, vocab_rows);
  out[idx] = row >= 0 ? wte[row * C + c] : __float2bfloat16(0.f);
}

__global__ void iota_kernel(int32_t* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = i;
}

// One warp per sorted position; only positions that start a run do work.
__global__ void embedding_backward_runs(float* dwte, const bf16* dout, const int32_t* sorted_tok,
                                        const int32_t* sorted_pos, int N, int C, int vocab_begin,
                                        int vocab_rows) {
  const int s = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (s >= N) return;
  const int tok = sorted_tok[s];
  if (s > 0 && sorted_tok[s - 1] == tok) return;
  const long local = local_row(tok, vocab_begin, vocab_rows);
  if (local < 0) return;  // another rank's row
  int e = s;
  while (e < N && sorted_tok[e] == tok) ++e;
  float* row = dwte + local * C;
  for (int c = lane; c < C; c += 32) {
    float acc = 0.f;
    for (int r = s; r < e; ++r) acc += bf(dout[static_cast<long>(sorted_pos[r]) * C + c]);
    row[c] += acc;
  }
}

}  // namespace

void embedding_forward(bf16* out, const int32_t* tokens, const bf16* wte, int N, int C,
                       int vocab_begin, int vocab_rows, cudaStream_t stream) {
  if (N <= 0 || C <= 0) return;
  if (C % 8 == 0 && aligned16(out, wte)) {
    const long total = static_cast<long>(N) * (C / 8);
    launch_dependent(embedding_forward_kernel, ceil_div(total, 256), 256, 0, stream, out, tokens,
                     wte, N, C, vocab_begin, vocab_rows);
  } else {
    const long total = static_cast<long>(N) * C;
    launch_dependent(embedding_forward_scalar, ceil_div(total, 256), 256, 0, stream, out, tokens,
                     wte, N, C, vocab_begin, vocab_rows);
  }
}

void embedding_backward(float* dwte, const bf16* dout, const int32_t* tokens, int N, int C,
                        int vocab_begin, int vocab_rows, cudaStream_t stream) {
  if (N <= 0 || C <= 0) return;
  size_t temp_bytes = 0;
  DMC_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, tokens,
                                                 static_cast<int32_t*>(nullptr),
                                                 static_cast<int32_t*>(nullptr),
                                                 static_cast<int32_t*>(nullptr), N, 0, 32, stream));
  const size_t arr = (static_cast<size_t>(N) * sizeof(int32_t) + 255) / 256 * 256;
  char* base = static_cast<char*>(scratch(kScratchEmbeddingSort, 3 * arr + temp_bytes));
  int32_t* pos_in = reinterpret_cast<int32_t*>(base);
  int32_t* tok_out = reinterpret_cast<int32_t*>(base + arr);
  int32_t* pos_out = reinterpret_cast<int32_t*>(base + 2 * arr);
  void* temp = base + 3 * arr;
  iota_kernel<<<ceil_div(N, 256), 256, 0, stream>>>(pos_in, N);
  DMC_CUDA_CHECK_LAUNCH();
  DMC_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, tokens, tok_out, pos_in,
                                                 pos_out, N, 0, 32, stream));
  embedding_backward_runs<<<ceil_div(N, 8), 256, 0, stream>>>(dwte, dout, tok_out, pos_out, N, C,
                                                               vocab_begin, vocab_rows);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
