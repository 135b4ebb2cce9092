// Decode throughput of a Llama-shaped model (random bf16 weights) at a fixed KV-cache memory
// budget: vanilla (every head holds every token) against DMC at compression ratios 2, 4 and 8.
// Shapes: 7b = Llama 2 7B (32 layers, 32 heads of 128, hidden 4096, MLP 11008, vocabulary 32000);
// 1b = TinyLlama 1.1B (22 layers, 32 query heads and 4 KV heads of 64, hidden 2048, MLP 5632),
// whose GQA groups of 8 take the decode attention's tensor-core kernel.
//
// For each method the cache is filled with as many sequences as the budget holds (pages of
// --page_size slots, K and V in bf16; DMC sequences are also charged their window state, w raw
// keys and values in bf16 and w fp32 importances per layer and head, as the GPU engine charges
// it), then one decode step for
// the whole batch is timed end to end: per layer RMSNorm, the Q, K, V GEMMs (cuBLAS through
// dmc::cuda::matmul_forward), RoPE on q and k, the paged decode attention over the cache, the O
// GEMM, the residual add, RMSNorm, the gate and up GEMMs, SwiGLU, the down GEMM, the residual add;
// then the final RMSNorm and the LM head. Not timed: sampling, and writing the new token's key and
// value into the cache (the DMC append-or-merge), which touch B·layers·heads rows per step.
// Eager launches on one stream, no CUDA graph (every kernel runs several microseconds, so the
// host stays ahead of the GPU). Median of CUDA-event timings after warm-up.
//
// --quant=int8|int4|int2 adds a row "vanilla+intN": vanilla's every-token cache at the same
// budget, quantized as the GPU engine's cache is (kernels/kv_quant.h; keys per channel, values
// per token over the whole head): per head (ctx − 1) / page_size quantized pages of random rows
// (dmc::cuda::kv_quantize_pages) and the other 1..page_size slots at bf16 in a residual block of
// page_size rows, each block charged in full. Its attention is paged_decode_attention_quantized;
// its bytes read are the pages' codes, scales and zero points and the residual rows; the line
// below the table also gives its K/V slots per second against vanilla's bf16 attention's.
//
// DMC lengths: per (layer, head) a fixed profile, 5% of heads uncompressed (1x) and the others a
// log-normal spread (sigma 0.8, clipped to [1/ctx, 1]) scaled so the mean is ctx / CR; per
// sequence a further log-normal jitter (sigma 0.25) on the compressed heads. The table gives the
// achieved CR (tokens over slots) of the admitted batch. Pages are shuffled in the pool.
//
//   usage: bench_decode [--shape=7b|1b] [--budget_gib=60] [--ctx=4096] [--page_size=16] [--reps=10]
//                       [--dmc_window=12] [--max_batch=0 (no cap)] [--seed=1]
//                       [--quant=int8|int4|int2 (none)]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"
#include "inference/dmc_window.h"
#include "kernels/kv_quant.h"
#include "bench/cuda/bench_util.cuh"

namespace {
using dmc::cuda::bf16;
using dmc::bench::dalloc;
using dmc::bench::rand_bf16;

struct Shape {
  const char* name;
  const char* description;
  int layers, heads, kv_heads, head_dim, hidden, mlp, vocab;
};
constexpr Shape kShapes[] = {
    {"7b", "Llama-2-7B shape (32 layers, 32 heads of 128, hidden 4096, MLP 11008, vocab 32000)",
     32, 32, 32, 128, 4096, 11008, 32000},
    {"1b", "TinyLlama-1.1B shape (22 layers, 32 query / 4 KV heads of 64, hidden 2048, MLP 5632, "
           "vocab 32000)",
     22, 32, 4, 64, 2048, 5632, 32000},
};

__global__ void add_inplace(bf16* x, const bf16* y, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    x[i] = __float2bfloat16(__bfloat162float(x[i]) + __bfloat162float(y[i]));
}

int g_reps = 10;
float time_ms(const std::function<void()>& f, int warmup = 2) {
  return dmc::bench::median_ms(f, g_reps, warmup);
}

struct Layer {
  bf16 *ln1, *wq, *wk, *wv, *wo, *ln2, *wg, *wu, *wd;
};

// Command line: --name=value.
double flag(int argc, char** argv, const char* name, double def) {
  const std::string key = std::string("--") + name + "=";
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], key.c_str(), key.size()) == 0) return std::atof(argv[i] + key.size());
  return def;
}

struct Method {
  std::string name;
  double cr;     // 1: vanilla
  int bits = 0;  // vanilla's cache quantized to bits (0: bf16)
};

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    static const char* known[] = {"--shape=", "--budget_gib=", "--ctx=", "--page_size=", "--reps=",
                                  "--dmc_window=", "--max_batch=", "--seed=", "--quant="};
    bool ok = false;
    for (const char* k : known) ok |= std::strncmp(argv[i], k, std::strlen(k)) == 0;
    if (!ok) {
      std::fprintf(stderr, "unknown argument %s (see the usage line at the top of the source)\n",
                   argv[i]);
      return 2;
    }
  }
  const Shape* shape = &kShapes[0];
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--shape=", 8) != 0) continue;
    shape = nullptr;
    for (const Shape& s : kShapes)
      if (std::strcmp(argv[i] + 8, s.name) == 0) shape = &s;
    if (shape == nullptr) {
      std::fprintf(stderr, "%s: unknown shape (7b or 1b)\n", argv[i]);
      return 2;
    }
  }
  const double budget_gib = flag(argc, argv, "budget_gib", 60);
  const int ctx = static_cast<int>(flag(argc, argv, "ctx", 4096));
  const int ps = static_cast<int>(flag(argc, argv, "page_size", 16));
  const int window = static_cast<int>(flag(argc, argv, "dmc_window", 12));
  const int max_batch = static_cast<int>(flag(argc, argv, "max_batch", 0));
  const uint64_t seed = static_cast<uint64_t>(flag(argc, argv, "seed", 1));
  g_reps = std::max(1, static_cast<int>(flag(argc, argv, "reps", 10)));
  int quant_bits = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--quant=", 8) != 0) continue;
    const std::string q = argv[i] + 8;
    quant_bits = q == "int8" ? 8 : q == "int4" ? 4 : q == "int2" ? 2 : -1;
    if (quant_bits < 0) {
      std::fprintf(stderr, "%s: unknown quantization (int8, int4 or int2)\n", argv[i]);
      return 2;
    }
  }
  if (ctx < 1 || ps < 1 || budget_gib <= 0) {
    std::fprintf(stderr, "bad --ctx, --page_size or --budget_gib\n");
    return 2;
  }
  if (!dmc::cuda::device_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  cudaDeviceProp prop;
  DMC_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d", std::localtime(&now));

  const int L = shape->layers, H = shape->heads, Hkv = shape->kv_heads, D = shape->head_dim,
            C = shape->hidden, F = shape->mlp, V = shape->vocab, CKV = Hkv * D;
  const long budget = static_cast<long>(budget_gib * 1024.0 * 1024.0 * 1024.0);
  const long page_bytes = 2L * ps * D * static_cast<long>(sizeof(bf16));  // K and V
  const long window_bytes =
      dmc::inference::DmcWindowBytes(window, D, sizeof(bf16), sizeof(float));  // the ring
  const long pool_pages = budget / page_bytes;
  if (pool_pages > 0x7fffffffL) {
    std::fprintf(stderr, "budget too large for int32 page ids at this page size\n");
    return 2;
  }

  // Device-to-device copy, the bandwidth ceiling (bytes read + written).
  double copy_gbs = 0;
  {
    const size_t n = size_t(1) << 30;
    char* a = dalloc<char>(n);
    char* b = dalloc<char>(n);
    DMC_CUDA_CHECK(cudaMemset(a, 1, n));
    const float ms =
        time_ms([&] { DMC_CUDA_CHECK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice)); });
    copy_gbs = 2.0 * n / ms * 1e-6;
    DMC_CUDA_CHECK(cudaFree(a));
    DMC_CUDA_CHECK(cudaFree(b));
  }

  // Weights (random bf16, nn.Linear [out, in]) and the KV pool (random bf16).
  std::vector<Layer> layers(L);
  for (auto& ly : layers) {
    ly.ln1 = rand_bf16(C, 0.3f);
    ly.ln2 = rand_bf16(C, 0.3f);
    ly.wq = rand_bf16(size_t(C) * C, 0.02f);
    ly.wk = rand_bf16(size_t(CKV) * C, 0.02f);
    ly.wv = rand_bf16(size_t(CKV) * C, 0.02f);
    ly.wo = rand_bf16(size_t(C) * C, 0.02f);
    ly.wg = rand_bf16(size_t(F) * C, 0.02f);
    ly.wu = rand_bf16(size_t(F) * C, 0.02f);
    ly.wd = rand_bf16(size_t(C) * F, 0.02f);
  }
  bf16* ln_f = rand_bf16(C, 0.3f);
  bf16* lm_head = rand_bf16(size_t(V) * C, 0.02f);
  const double weight_bytes =
      2.0 * (double(L) * (2.0 * C * C + 2.0 * C * CKV + 3.0 * C * F + 2.0 * C) + double(V) * C +
             C);
  // K and V in one buffer, which the quantized method (run last) reuses as its pool of pages.
  const size_t pool_elems = static_cast<size_t>(pool_pages) * ps * D;
  bf16* k_pool = rand_bf16(2 * pool_elems, 1.f);
  bf16* v_pool = k_pool + pool_elems;
  DMC_CUDA_CHECK(cudaDeviceSynchronize());

  std::printf("## Decode throughput at a fixed KV budget\n\n");
  std::printf("GPU: %s (%d SMs), %s. %s, random bf16 weights (%.2f GB). KV budget %.1f GiB in "
              "pages of %d slots, context %d tokens, DMC window state w=%d (bf16 keys and values, fp32 "
              "importances) charged per head. One decode step timed end to end, eager launches (no CUDA graph), median of "
              "%d. Device copy: %.0f GB/s (read + write).\n\n",
              prop.name, prop.multiProcessorCount, date, shape->description, weight_bytes * 1e-9,
              budget_gib, ps, ctx,
              window, g_reps, copy_gbs);

  // One global page order (pages shuffled in the pool), taken in turn by every head.
  std::mt19937_64 rng(seed);
  std::vector<int32_t> page_order(pool_pages);
  std::iota(page_order.begin(), page_order.end(), 0);
  std::shuffle(page_order.begin(), page_order.end(), rng);

  std::vector<Method> methods = {{"vanilla", 1}, {"DMC", 2}, {"DMC", 4}, {"DMC", 8}};
  if (quant_bits > 0) methods.push_back({"vanilla+int" + std::to_string(quant_bits), 1, quant_bits});
  const dmc::kernels::KvQuantPageLayout qlayout = dmc::kernels::kv_quant_page_layout(
      dmc::kernels::KvQuantOptions{quant_bits > 0 ? quant_bits : 8}, ps, D);
  const long residual_bytes = 2L * ps * D * static_cast<long>(sizeof(bf16));  // one block, K and V
  const long qpool_pages = static_cast<long>(2 * pool_elems * sizeof(bf16)) / qlayout.bytes;
  double vanilla_attn_slots_per_s = 0;
  double vanilla_tps = 0;
  std::vector<std::string> rows;
  std::vector<std::string> bw_lines;
  for (const Method& m : methods) {
    const bool dmc = m.cr > 1, quant = m.bits > 0;
    // Per-(layer, head) profile of kept fractions, mean 1 / CR.
    std::vector<double> frac(static_cast<size_t>(L) * Hkv, 1.0);
    std::vector<char> full(frac.size(), 1);
    if (dmc) {
      std::normal_distribution<double> z(0, 1);
      std::uniform_real_distribution<double> u(0, 1);
      std::vector<double> zz(frac.size());
      for (size_t i = 0; i < frac.size(); ++i) {
        full[i] = u(rng) < 0.05;
        zz[i] = z(rng);
      }
      const double target = 1.0 / m.cr, lo_f = 1.0 / ctx;
      auto mean_for = [&](double mu) {
        double s = 0;
        for (size_t i = 0; i < frac.size(); ++i)
          s += full[i] ? 1.0 : std::clamp(mu * std::exp(0.8 * zz[i]), lo_f, 1.0);
        return s / frac.size();
      };
      double lo = 1e-9, hi = 1.0;
      for (int it = 0; it < 100; ++it) {
        const double mid = 0.5 * (lo + hi);
        (mean_for(mid) < target ? lo : hi) = mid;
      }
      for (size_t i = 0; i < frac.size(); ++i)
        frac[i] = full[i] ? 1.0 : std::clamp(hi * std::exp(0.8 * zz[i]), lo_f, 1.0);
    }
    // Admit sequences while the budget holds them.
    std::vector<int> lens;  // [batch][layer][head]
    long used_bytes = 0, used_pages = 0;
    const long pool_limit = quant ? qpool_pages : pool_pages;
    int batch = 0, max_pages = 1;
    std::normal_distribution<double> jit(0, 0.25);
    const int batch_cap = max_batch > 0 ? max_batch : 16384;  // bounds activations and tables
    while (batch < batch_cap) {
      std::vector<int> seq(frac.size());
      long pages = 0;
      for (size_t i = 0; i < frac.size(); ++i) {
        double f = frac[i];
        if (dmc && !full[i]) f *= std::exp(jit(rng) - 0.03125);
        seq[i] = static_cast<int>(std::clamp(std::lround(f * ctx), 1L, static_cast<long>(ctx)));
        pages += quant ? (seq[i] - 1) / ps : (seq[i] + ps - 1) / ps;
      }
      const long bytes = quant ? pages * qlayout.bytes + long(frac.size()) * residual_bytes
                               : pages * page_bytes + (dmc ? long(frac.size()) * window_bytes : 0);
      if (used_bytes + bytes > budget || used_pages + pages > pool_limit) break;
      used_bytes += bytes;
      used_pages += pages;
      lens.insert(lens.end(), seq.begin(), seq.end());
      for (int n : seq) max_pages = std::max(max_pages, quant ? (n - 1) / ps : (n + ps - 1) / ps);
      ++batch;
    }
    if (batch == 0) {
      std::printf("%s CR %.0f: not even one sequence fits the budget\n", m.name.c_str(), m.cr);
      continue;
    }
    const int B = batch;
    // Block tables per layer: page_table [L][B][Hkv][max_pages], lengths [L][B][Hkv].
    std::vector<int32_t> table(static_cast<size_t>(L) * B * Hkv * max_pages, 0);
    // Quantized: lengths are the quantized slots, r_lengths the residual ones, and head
    // (l, b, h) owns residual block (l·B + b)·Hkv + h.
    std::vector<int> lengths(static_cast<size_t>(L) * B * Hkv), r_lengths(lengths.size());
    std::vector<int32_t> blocks(lengths.size());
    std::iota(blocks.begin(), blocks.end(), 0);
    std::vector<int32_t> qpage_order;
    if (quant) {  // the pages the batch takes, in shuffled order
      qpage_order.resize(used_pages);
      std::iota(qpage_order.begin(), qpage_order.end(), 0);
      std::shuffle(qpage_order.begin(), qpage_order.end(), rng);
    }
    long next = 0, slots = 0;
    double kv_bytes = 0;
    for (int b = 0; b < B; ++b)
      for (int l = 0; l < L; ++l)
        for (int h = 0; h < Hkv; ++h) {
          const int n = lens[(static_cast<size_t>(b) * L + l) * Hkv + h];
          const size_t head = (static_cast<size_t>(l) * B + b) * Hkv + h;
          slots += n;
          if (quant) {
            const int qp = (n - 1) / ps;
            lengths[head] = qp * ps;
            r_lengths[head] = n - qp * ps;
            kv_bytes += double(qp) * qlayout.bytes + 2.0 * r_lengths[head] * D * sizeof(bf16);
            for (int p = 0; p < qp; ++p) table[head * max_pages + p] = qpage_order[next++];
          } else {
            lengths[head] = n;
            kv_bytes += 2.0 * n * D * sizeof(bf16);
            for (int p = 0; p < (n + ps - 1) / ps; ++p)
              table[head * max_pages + p] = page_order[next++];
          }
        }
    const double achieved_cr = double(B) * L * Hkv * ctx / slots;
    int32_t* d_table = dalloc<int32_t>(table.size());
    int* d_len = dalloc<int>(lengths.size());
    DMC_CUDA_CHECK(cudaMemcpy(d_table, table.data(), sizeof(int32_t) * table.size(),
                              cudaMemcpyHostToDevice));
    DMC_CUDA_CHECK(cudaMemcpy(d_len, lengths.data(), sizeof(int) * lengths.size(),
                              cudaMemcpyHostToDevice));
    // The quantized method's pages (random rows, quantized on the device, in batches) over the
    // bf16 pool's memory, and its residual blocks.
    uint8_t* qpool = reinterpret_cast<uint8_t*>(k_pool);
    int *d_rlen = nullptr;
    int32_t* d_blocks = nullptr;
    bf16 *r_k = nullptr, *r_v = nullptr;
    if (quant) {
      d_rlen = dalloc<int>(r_lengths.size());
      d_blocks = dalloc<int32_t>(blocks.size());
      DMC_CUDA_CHECK(cudaMemcpy(d_rlen, r_lengths.data(), sizeof(int) * r_lengths.size(),
                                cudaMemcpyHostToDevice));
      DMC_CUDA_CHECK(cudaMemcpy(d_blocks, blocks.data(), sizeof(int32_t) * blocks.size(),
                                cudaMemcpyHostToDevice));
      r_k = rand_bf16(blocks.size() * ps * D, 1.f);
      r_v = rand_bf16(blocks.size() * ps * D, 1.f);
      constexpr int kSrcRows = 1 << 14, kBatch = 1 << 16;
      bf16* src_k = rand_bf16(size_t(kSrcRows) * D, 1.f);
      bf16* src_v = rand_bf16(size_t(kSrcRows) * D, 1.f);
      std::vector<int32_t> ids(kBatch), rows(size_t(kBatch) * ps);
      int32_t* d_ids = dalloc<int32_t>(ids.size());
      int32_t* d_rows = dalloc<int32_t>(rows.size());
      for (long first = 0; first < used_pages; first += kBatch) {
        const int n = static_cast<int>(std::min<long>(kBatch, used_pages - first));
        for (int j = 0; j < n; ++j) {
          ids[j] = static_cast<int32_t>(first + j);
          for (int r = 0; r < ps; ++r)
            rows[size_t(j) * ps + r] = static_cast<int32_t>(((first + j) * ps + r) % kSrcRows);
        }
        DMC_CUDA_CHECK(cudaMemcpy(d_ids, ids.data(), sizeof(int32_t) * n, cudaMemcpyHostToDevice));
        DMC_CUDA_CHECK(cudaMemcpy(d_rows, rows.data(), sizeof(int32_t) * n * ps,
                                  cudaMemcpyHostToDevice));
        dmc::cuda::kv_quantize_pages(qpool, qlayout, d_ids, src_k, src_v, d_rows, n);
      }
      DMC_CUDA_CHECK(cudaDeviceSynchronize());
      for (void* p : {(void*)src_k, (void*)src_v, (void*)d_ids, (void*)d_rows})
        DMC_CUDA_CHECK(cudaFree(p));
    }

    // Activations.
    bf16 *x = rand_bf16(size_t(B) * C, 1.f), *xn = dalloc<bf16>(size_t(B) * C);
    bf16 *q = dalloc<bf16>(size_t(B) * C), *k = dalloc<bf16>(size_t(B) * CKV),
         *v = dalloc<bf16>(size_t(B) * CKV), *att = dalloc<bf16>(size_t(B) * C),
         *y = dalloc<bf16>(size_t(B) * C);
    bf16 *g = dalloc<bf16>(size_t(B) * F), *u = dalloc<bf16>(size_t(B) * F),
         *hmid = dalloc<bf16>(size_t(B) * F), *logits = dalloc<bf16>(size_t(B) * V);
    float* rstd = dalloc<float>(B);
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    const float theta = 10000.f;
    const size_t nx = size_t(B) * C;
    const int add_blocks = std::min<long>(4096, (nx + 255) / 256);
    auto attention = [&](int l) {
      const size_t off = static_cast<size_t>(l) * B * Hkv;
      if (quant) {
        dmc::cuda::paged_decode_attention_quantized(
            att, nullptr, 0, q, qpool, qlayout, d_table + off * max_pages, d_len + off, max_pages,
            r_k, r_v, d_blocks + off, d_rlen + off, ps, B, H, Hkv, D, /*exclude_ctrl=*/false,
            scale);
        return;
      }
      dmc::cuda::paged_decode_attention(att, nullptr, 0, q, k_pool, v_pool,
                                        d_table + off * max_pages, d_len + off, max_pages, ps, B,
                                        H, Hkv, D, /*exclude_ctrl=*/dmc, scale);
    };
    auto step = [&] {
      for (int l = 0; l < L; ++l) {
        const Layer& w = layers[l];
        dmc::cuda::rmsnorm_forward(xn, rstd, x, w.ln1, B, C, 1e-5f);
        dmc::cuda::matmul_forward(q, xn, w.wq, B, C, C);
        dmc::cuda::matmul_forward(k, xn, w.wk, B, C, CKV);
        dmc::cuda::matmul_forward(v, xn, w.wv, B, C, CKV);
        dmc::cuda::rope_forward(q, q, B, 1, H, D, ctx, theta, dmc);
        dmc::cuda::rope_forward(k, k, B, 1, Hkv, D, ctx, theta, dmc);
        attention(l);
        dmc::cuda::matmul_forward(y, att, w.wo, B, C, C);
        add_inplace<<<add_blocks, 256>>>(x, y, nx);
        DMC_CUDA_CHECK_LAUNCH();
        dmc::cuda::rmsnorm_forward(xn, rstd, x, w.ln2, B, C, 1e-5f);
        dmc::cuda::matmul_forward(g, xn, w.wg, B, C, F);
        dmc::cuda::matmul_forward(u, xn, w.wu, B, C, F);
        dmc::cuda::swiglu_forward(hmid, g, u, B, F, F);
        dmc::cuda::matmul_forward(y, hmid, w.wd, B, F, C);
        add_inplace<<<add_blocks, 256>>>(x, y, nx);
        DMC_CUDA_CHECK_LAUNCH();
      }
      dmc::cuda::rmsnorm_forward(xn, rstd, x, ln_f, B, C, 1e-5f);
      dmc::cuda::matmul_forward(logits, xn, lm_head, B, C, V);
    };
    const float step_ms = time_ms(step);
    const float attn_ms = time_ms([&] {
      for (int l = 0; l < L; ++l) attention(l);
    });
    DMC_CUDA_CHECK(cudaDeviceSynchronize());
    const double tps = B / (step_ms * 1e-3);
    if (!dmc) vanilla_tps = tps;
    const double attn_gbs = kv_bytes / (attn_ms * 1e-3) * 1e-9;
    const double attn_slots_per_s = slots / (attn_ms * 1e-3);
    if (m.name == "vanilla") vanilla_attn_slots_per_s = attn_slots_per_s;
    const double floor_ms = (weight_bytes + kv_bytes) / (copy_gbs * 1e9) * 1e3;
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "| %-7s | %4.0f | %6.2f | %5d | %7.2f | %7.2f | %8.0f | %5.2fx | %7.2f | %6.0f "
                  "| %4.0f%% |",
                  m.name.c_str(), m.cr, achieved_cr, B, step_ms, floor_ms, tps,
                  vanilla_tps > 0 ? tps / vanilla_tps : 0.0, attn_ms, attn_gbs,
                  100.0 * attn_gbs / copy_gbs);
    rows.push_back(buf);
    if (quant)
      std::snprintf(buf, sizeof buf,
                    "attention, %s: %.2f GB of codes, scales, zero points and residual rows read "
                    "in %.3f ms per step = %.0f GB/s, %.0f%% of the device copy (%.0f GB/s); "
                    "%.3g K/V slots per second, %.2fx vanilla's bf16 attention",
                    m.name.c_str(), kv_bytes * 1e-9, attn_ms, attn_gbs,
                    100.0 * attn_gbs / copy_gbs, copy_gbs, attn_slots_per_s,
                    vanilla_attn_slots_per_s > 0 ? attn_slots_per_s / vanilla_attn_slots_per_s
                                                 : 0.0);
    else
      std::snprintf(buf, sizeof buf,
                    "attention, %s CR %.0f: %.2f GB of K/V read in %.3f ms per step = %.0f GB/s, "
                    "%.0f%% of the device copy (%.0f GB/s)",
                    m.name.c_str(), m.cr, kv_bytes * 1e-9, attn_ms, attn_gbs,
                    100.0 * attn_gbs / copy_gbs, copy_gbs);
    bw_lines.push_back(buf);
    std::fprintf(stderr, "%s CR %.0f done: batch %d, %.2f ms/step\n", m.name.c_str(), m.cr, B,
                 step_ms);

    for (bf16* p : {x, xn, q, k, v, att, y, g, u, hmid, logits}) DMC_CUDA_CHECK(cudaFree(p));
    DMC_CUDA_CHECK(cudaFree(rstd));
    DMC_CUDA_CHECK(cudaFree(d_table));
    DMC_CUDA_CHECK(cudaFree(d_len));
    if (quant)
      for (void* p : {(void*)d_rlen, (void*)d_blocks, (void*)r_k, (void*)r_v})
        DMC_CUDA_CHECK(cudaFree(p));
  }

  std::printf("| method | target CR | achieved CR | max batch | ms/step | HBM floor ms | tokens/s "
              "| vs vanilla | attention ms/step | attention GB/s | of copy |\n");
  std::printf("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (const auto& r : rows) std::printf("%s\n", r.c_str());
  std::printf("\nHBM floor: (weights + K/V of the batch) / device-copy bandwidth. Attention: the "
              "%d layers' paged decode attention alone (main + combine kernels), bytes = K/V "
              "slots read.\n\n", L);
  for (const auto& l : bw_lines) std::printf("%s\n", l.c_str());
  return 0;
}
