// End-to-end generation on the GPU engine (inference/cuda_engine.h) under continuous batching:
// every request's prompt by parallel prefill, then token by token with the append-or-merge,
// the LM head and the token choice on the device, at a fixed KV-cache memory budget. Per method:
// the most sequences that ran at once, decode tokens/s (generated tokens over the wall time of
// the whole run, prefill included), prefill tokens/s (prompt tokens over the time spent in
// prefill), time to first token (from the start of the run) and per-token latency (the gaps
// between a request's successive tokens) at p50/p99, and the CR the cache reached.
//
//   bench_generate --shape=7b|1b|tiny [--model=HF_DIR] [--methods=vanilla,dmc:2,dmc:4,dmc:8]
//                  [--budget_gb=40] [--requests=256] [--prompt=512:4096] [--generate=256:1024]
//                  [--max_batch=1024] [--export_dir=DIR] [--seed=1]
//
// Shapes: 7b = Llama-2-7B (32 layers, hidden 4096, 32 heads of 128, ffn 11008, vocab 32000,
// context 4096 + 1024); 1b = a 0.97B GQA Llama (22 layers, hidden 2048, 32 heads / 4 KV heads,
// ffn 5632); tiny for a quick check. --model loads a dmc-export checkpoint instead (its own
// decisions). A random-weight model is built on the host (uniform weights of std 0.02, norms 1)
// and, with --export_dir, written by dmc-export's writer (trainer::ExportModel): DIR/vanilla for
// a peer to load, DIR/dmcCR (the calibrated control channel) for dmc-eval and dmc-serve.
//
// dmc:CR on random weights: the decisions still come from the model's own control channel. The
// embedding's channel 0 is 1 for every token and no layer writes to it, so the RMS-normalised
// hidden state x̂ carries a large, nearly constant component there; row D−1 of KV head h's k_proj is u_h + b_h · e_0, u_h a
// random unit vector orthogonal to e_0, so k[D−1] = x̂ · u_h + b_h · x̂_0 is a spread around a mean
// set by b_h, and the head merges where it exceeds init_val. (Without the e_0 term k[D−1] has
// zero mean and no head could merge more than half its tokens: CR 2 at most.) Each head's target
// merge fraction is f_h = 1 − r_h / CR, r_h = exp(N(0, 0.5²)) normalised to mean 1 over the model
// (the mean kept fraction is 1 / CR, and heads differ), clipped to [0, 0.995]; b_h is found by
// bisection on prefills of the run's own prompts (Calibrate), all heads at once, since earlier
// layers' merges change later layers' inputs. The achieved CR is measured on the run and printed.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "inference/cuda_engine.h"
#include "inference/hf_model.h"
#include "inference/scheduler.h"
#include "model/llama.h"
#include "trainer/export.h"

ABSL_FLAG(std::string, shape, "tiny", "7b, 1b or tiny (random weights); ignored with --model");
ABSL_FLAG(std::string, model, "", "a dmc-export checkpoint to run instead of random weights");
ABSL_FLAG(std::string, methods, "vanilla,dmc:2,dmc:4,dmc:8", "vanilla or dmc:CR, comma-separated");
ABSL_FLAG(double, budget_gb, 40, "KV cache budget (GiB), pages and window state");
ABSL_FLAG(int, requests, 256, "requests, all submitted at the start");
ABSL_FLAG(std::string, prompt, "512:4096", "prompt lengths, uniform in LO:HI");
ABSL_FLAG(std::string, generate, "256:1024", "generated tokens per request, uniform in LO:HI");
ABSL_FLAG(int, max_batch, 1024, "sequences at once at most (the budget usually binds first)");
ABSL_FLAG(int, page_size, 16, "slots per KV page");
ABSL_FLAG(std::string, export_dir, "",
          "write the random model here (dmc-export layout): DIR/vanilla, and DIR/dmcCR as each "
          "dmc:CR calibrates it");
ABSL_FLAG(uint64_t, seed, 1, "weights and request lengths");
ABSL_FLAG(bool, cuda_graphs, true, "replay each step as a CUDA graph");

namespace {
namespace inf = dmc::inference;
using dmc::model::LlamaConfig;

LlamaConfig Shape(const std::string& name) {
  LlamaConfig c;
  c.vocab_size = 32000;
  c.rope_theta = 10000.0f;
  c.dmc.window = 12;
  if (name == "7b") {
    c.hidden_size = 4096, c.intermediate_size = 11008, c.num_hidden_layers = 32;
    c.num_attention_heads = 32, c.num_key_value_heads = 32, c.max_position_embeddings = 5120;
  } else if (name == "1b") {
    c.hidden_size = 2048, c.intermediate_size = 5632, c.num_hidden_layers = 22;
    c.num_attention_heads = 32, c.num_key_value_heads = 4, c.max_position_embeddings = 5120;
  } else {
    c.hidden_size = 256, c.intermediate_size = 704, c.num_hidden_layers = 2;
    c.num_attention_heads = 4, c.num_key_value_heads = 2, c.max_position_embeddings = 1024;
  }
  return c;
}

// Uniform weights of std 0.02 (norms 1) from a counter hash: fast and reproducible; the
// embedding's channel 0 is 1 (the decisions' offset, see the file comment).
void RandomWeights(dmc::model::Llama<float>* m, uint64_t seed) {
  for (const auto& spec : m->param_specs()) {
    float* p = m->params().data() + spec.offset;
    const bool norm = spec.name.find("norm") != std::string::npos;
    const long n = static_cast<long>(spec.size);
#pragma omp parallel for
    for (long i = 0; i < n; ++i) {
      uint64_t z = seed + spec.offset + i + 0x9E3779B97F4A7C15ull * (i + 1);
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      const float u = static_cast<float>(z >> 40) / 16777216.0f;  // [0, 1)
      p[i] = norm ? 1.0f : (2 * u - 1) * 0.0346f;                   // std 0.02
    }
  }
  const LlamaConfig& c = m->config();
  float* emb = m->params().data() + m->FindParam("model.embed_tokens.weight")->offset;
  for (int v = 0; v < c.vocab_size; ++v) emb[static_cast<size_t>(v) * c.hidden_size] = 1.0f;
  // No layer writes channel 0 (row 0 of o_proj and down_proj is zero), so it stays 1 in the
  // residual stream at every depth, as trained models' massive activations do.
  for (int l = 0; l < c.num_hidden_layers; ++l)
    for (const char* name : {"self_attn.o_proj.weight", "mlp.down_proj.weight"}) {
      const auto* spec = m->FindParam(absl::StrFormat("model.layers.%d.%s", l, name));
      std::fill_n(m->params().data() + spec->offset, spec->size / c.hidden_size, 0.0f);
    }
}

// Each head's target merge fraction for a mean CR (see the file comment).
std::vector<double> TargetMergeFractions(int heads, double cr, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 0.5);
  std::vector<double> r(heads), f(heads);
  double mean = 0;
  for (double& x : r) mean += (x = std::exp(normal(rng))) / heads;
  for (int i = 0; i < heads; ++i) f[i] = std::clamp(1.0 - r[i] / mean / cr, 0.0, 0.995);
  return f;
}

// Row D−1 of every KV head's k_proj := u_head + bias[head] · e_0 (u a fixed random unit vector
// orthogonal to e_0).
void SetControlRows(dmc::model::Llama<float>* m, const std::vector<double>& bias, uint64_t seed) {
  const LlamaConfig& c = m->config();
  const int C = c.hidden_size, D = c.head_dim(), Hkv = c.num_key_value_heads;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    float* wk = m->params().data() +
                m->FindParam(absl::StrFormat("model.layers.%d.self_attn.k_proj.weight", l))->offset;
    for (int h = 0; h < Hkv; ++h) {
      std::vector<double> u(C);
      double norm = 0;
      for (int j = 1; j < C; ++j) norm += (u[j] = normal(rng)) * u[j];
      float* row = wk + static_cast<size_t>(h * D + D - 1) * C;
      for (int j = 1; j < C; ++j) row[j] = static_cast<float>(u[j] / std::sqrt(norm));
      row[0] = static_cast<float>(bias[l * Hkv + h]);
    }
  }
}

// The control rows for a target CR: per head, bisection of log2 b_h on [-6, 8] against the merge
// fraction that prefills of the run's first prompts measure, 14 rounds (b_h to 0.1%). The
// residual stream's RMS grows with depth, so x̂_0 = 1 / RMS shrinks from ~34 in the first layer
// of the 1b shape to below 1 in deep ones: b_h spans orders of magnitude across layers.
void Calibrate(dmc::model::Llama<float>* m, const inf::CudaEngineOptions& o,
               const std::vector<inf::Request>& requests, double cr, uint64_t seed) {
  const LlamaConfig& c = m->config();
  const int Hkv = c.num_key_value_heads, heads = c.num_hidden_layers * Hkv;
  const std::vector<double> want = TargetMergeFractions(heads, cr, seed);
  constexpr int kRounds = 14;
  std::vector<double> lo(heads, -6.0), hi(heads, 8.0), log_bias(heads), bias(heads);
  for (int round = 0; round < kRounds; ++round) {
    for (int i = 0; i < heads; ++i) {
      log_bias[i] = 0.5 * (lo[i] + hi[i]);
      bias[i] = want[i] <= 0 ? 0.0 : std::exp2(log_bias[i]);
    }
    SetControlRows(m, bias, seed);
    auto engine = inf::CudaEngine::Create(*m, o);
    if (!engine.ok()) {
      std::fprintf(stderr, "bench_generate: calibration: %s\n", engine.status().ToString().c_str());
      std::exit(1);
    }
    std::vector<double> kept(heads, 0.0);
    double fed = 0;
    for (int r = 0; r < std::min<int>(8, requests.size()); ++r) {
      inf::TokenOutput out;
      absl::Status s = (*engine)->AddSequence(r, {});
      if (s.ok()) s = (*engine)->Prefill(r, requests[r].tokens, -1, &out);
      if (!s.ok()) {
        std::fprintf(stderr, "bench_generate: calibration prefill: %s\n", s.ToString().c_str());
        std::exit(1);
      }
      fed += requests[r].tokens.size();
      for (int l = 0; l < c.num_hidden_layers; ++l)
        for (int h = 0; h < Hkv; ++h) kept[l * Hkv + h] += (*engine)->length(r, l, h);
      (*engine)->Free(r).IgnoreError();
    }
    double merged = 0, target = 0;
    for (int i = 0; i < heads; ++i) {
      (1.0 - kept[i] / fed < want[i] ? lo[i] : hi[i]) = log_bias[i];
      merged += (1.0 - kept[i] / fed) / heads;
      target += want[i] / heads;
    }
    std::fprintf(stderr, "calibrating dmc:%g, round %d/%d: merged fraction %.3f (target %.3f)\n",
                 cr, round + 1, kRounds, merged, target);
  }
}

// dmc-export's writer, in bf16; `dmc` says whether config.json enables the control channel.
void Export(const dmc::model::Llama<float>& model, bool dmc, const std::string& dir) {
  dmc::model::Llama<float> copy = model;
  copy.set_compression_enabled(dmc);
  if (absl::Status s = dmc::trainer::ExportModel(copy, dir, dmc::model::DType::kBF16, 4L << 30);
      !s.ok()) {
    std::fprintf(stderr, "bench_generate: %s\n", s.ToString().c_str());
    std::exit(1);
  }
}

std::pair<int, int> Range(const std::string& s) {
  std::vector<std::string> p = absl::StrSplit(s, ':');
  int lo = 0, hi = 0;
  if (p.size() != 2 || !absl::SimpleAtoi(p[0], &lo) || !absl::SimpleAtoi(p[1], &hi) || lo < 1 ||
      hi < lo) {
    std::fprintf(stderr, "bench_generate: bad range %s (LO:HI)\n", s.c_str());
    std::exit(1);
  }
  return {lo, hi};
}

double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * v.size()))];
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using Clock = std::chrono::steady_clock;
  const uint64_t seed = absl::GetFlag(FLAGS_seed);
  std::unique_ptr<dmc::model::Llama<float>> model;
  if (!absl::GetFlag(FLAGS_model).empty()) {
    auto loaded = inf::LoadHfModel(absl::GetFlag(FLAGS_model));
    if (!loaded.ok()) {
      std::fprintf(stderr, "bench_generate: %s\n", loaded.status().ToString().c_str());
      return 1;
    }
    model = *std::move(loaded);
  } else {
    LlamaConfig c = Shape(absl::GetFlag(FLAGS_shape));
    c.dmc.enabled = true;  // the control channel exists; vanilla ignores its decisions
    model = std::make_unique<dmc::model::Llama<float>>(c, nullptr);
    RandomWeights(model.get(), seed);
  }
  const LlamaConfig& c = model->config();
  const std::string export_dir = absl::GetFlag(FLAGS_export_dir);
  if (!export_dir.empty()) Export(*model, false, export_dir + "/vanilla");
  const auto [p_lo, p_hi] = Range(absl::GetFlag(FLAGS_prompt));
  const auto [g_lo, g_hi] = Range(absl::GetFlag(FLAGS_generate));
  const int n = absl::GetFlag(FLAGS_requests);
  std::mt19937_64 rng(seed + 7);
  std::vector<inf::Request> base(n);
  for (auto& q : base) {
    const int P = std::uniform_int_distribution<int>(p_lo, p_hi)(rng);
    const int G = std::uniform_int_distribution<int>(g_lo, g_hi)(rng);
    for (int t = 0; t < P; ++t) q.tokens.push_back(static_cast<int32_t>(rng() % c.vocab_size));
    q.length = P + G - 1;  // the last generated token is chosen, never fed
    q.prefill = true;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("bench_generate on %s: %d layers, hidden %d, %d heads / %d KV heads of %d, %d "
              "requests, prompts %d-%d, generated %d-%d, KV budget %.1f GiB, page %d\n",
              prop.name, c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
              c.num_key_value_heads, c.head_dim(), n, p_lo, p_hi, g_lo, g_hi,
              absl::GetFlag(FLAGS_budget_gb), absl::GetFlag(FLAGS_page_size));
  std::printf("| method | CR reached | max concurrent | decode tok/s | prefill tok/s | TTFT p50 s | "
              "TTFT p99 s | token p50 ms | token p99 ms | run s | in steps s | in prefill s | steps "
              "|\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
  std::fflush(stdout);

  const std::vector<std::string> specs = absl::StrSplit(absl::GetFlag(FLAGS_methods), ',');
  for (const std::string& spec : specs) {
    std::vector<std::string> parts = absl::StrSplit(spec, ':');
    double cr = 1;
    if (parts.size() == 2) absl::SimpleAtod(parts[1], &cr);
    inf::CudaEngineOptions o;
    o.policy.method = parts[0] == "dmc" ? inf::CacheMethod::kDmc : inf::CacheMethod::kVanilla;
    o.budget_bytes = static_cast<long>(absl::GetFlag(FLAGS_budget_gb) * (1L << 30));
    o.page_size = absl::GetFlag(FLAGS_page_size);
    o.max_batch = absl::GetFlag(FLAGS_max_batch);
    o.max_context = std::min(c.max_position_embeddings, p_hi + g_hi);
    o.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
    if (o.policy.method == inf::CacheMethod::kDmc && absl::GetFlag(FLAGS_model).empty()) {
      Calibrate(model.get(), o, base, cr, seed + 3);
      if (!export_dir.empty()) Export(*model, true, export_dir + "/dmc" + parts[1]);
    }
    auto engine = inf::CudaEngine::Create(*model, o);
    if (!engine.ok()) {
      std::fprintf(stderr, "bench_generate: %s\n", engine.status().ToString().c_str());
      return 1;
    }
    std::vector<inf::Request> requests = base;
    std::vector<Clock::time_point> last(n);
    std::vector<double> ttft, gaps;
    long generated = 0, tokens_held = 0, slots_held = 0;
    const int heads = c.num_hidden_layers * c.num_key_value_heads;
    const auto start = Clock::now();
    auto stats = inf::RunBatched(
        **engine, requests, o.max_batch,
        [&](int r, int pos, const inf::TokenOutput&) {
          const auto now = Clock::now();
          if (pos + 1 == static_cast<int>(base[r].tokens.size())) {
            ttft.push_back(std::chrono::duration<double>(now - start).count());
          } else {
            gaps.push_back(std::chrono::duration<double, std::milli>(now - last[r]).count());
          }
          last[r] = now;
          ++generated;
          return true;
        },
        [&](int r, bool) {
          tokens_held += static_cast<long>((*engine)->tokens(r)) * heads;
          for (int l = 0; l < c.num_hidden_layers; ++l)
            for (int h = 0; h < c.num_key_value_heads; ++h) slots_held += (*engine)->length(r, l, h);
        });
    if (!stats.ok()) {
      std::fprintf(stderr, "bench_generate: %s\n", stats.status().ToString().c_str());
      return 1;
    }
    std::printf("| %s | %.2f | %d | %.0f | %.0f | %.2f | %.2f | %.1f | %.1f | %.1f | %.1f | %.1f | %ld |\n",
                spec.c_str(), double(tokens_held) / std::max(1L, slots_held),
                stats->max_concurrent, generated / stats->seconds,
                stats->prefill_tokens / std::max(1e-9, stats->prefill_seconds),
                Percentile(ttft, 0.5), Percentile(ttft, 0.99), Percentile(gaps, 0.5),
                Percentile(gaps, 0.99), stats->seconds, stats->step_seconds, stats->prefill_seconds,
                stats->steps);
    std::fflush(stdout);
  }
  return 0;
}
