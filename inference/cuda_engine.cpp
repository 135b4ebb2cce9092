#include "inference/cuda_engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "absl/strings/str_format.h"
#include "inference/paged_decoder.h"
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

// llama_cuda.cu's helpers: the bf16 conversion, and DMS's query channel (read into x [N, Hkv], or
// set from value, null: zeroed).
namespace dmc::model::cuda_model_detail {
void to_bf16(cuda::bf16* out, const float* in, size_t n, cudaStream_t stream);
void get_dms_query_channel(float* x, const cuda::bf16* q, long N, int H, int Hkv, int D,
                           cudaStream_t stream, long row_stride = 0);
void set_dms_query_channel(cuda::bf16* q, const float* value, long N, int H, int Hkv, int D,
                           cudaStream_t stream, long row_stride = 0);
}

namespace dmc::inference {
namespace c = dmc::cuda;
using c::bf16;

#define ENGINE_CUDA(expr)                                                                  \
  do {                                                                                     \
    cudaError_t err_ = (expr);                                                             \
    if (err_ != cudaSuccess)                                                               \
      throw std::runtime_error(absl::StrFormat("CUDA error %s at %s:%d: %s",               \
                                               cudaGetErrorName(err_), __FILE__, __LINE__, \
                                               cudaGetErrorString(err_)));                 \
  } while (0)

namespace {

using model::LayerTensor;
using model::kAttnNorm, model::kWq, model::kWk, model::kWv, model::kWo, model::kMlpNorm,
    model::kGate, model::kDown, model::kLayerTensors;

template <typename X>
X* Alloc(size_t n) {
  X* p = nullptr;
  ENGINE_CUDA(cudaMalloc(reinterpret_cast<void**>(&p), std::max<size_t>(1, n) * sizeof(X)));
  return p;
}

// A prompt's (or chunk's) gate arrays for `rows` tokens, carved from the engine's gate buffer
// (five arrays of [max_context, Hkv]), each [rows, Hkv].
kernels::DmcGateTensors<float> PromptGates(float* buffer, int rows, int Hkv) {
  const size_t g = static_cast<size_t>(rows) * Hkv;
  return {buffer, buffer + g, buffer + 2 * g, buffer + 3 * g, buffer + 4 * g};
}

}  // namespace

// Step inputs and outputs travel in one pinned block each way.
struct StepIo {
  int32_t* tokens;
  int32_t* positions;
  int32_t* targets;
  int32_t* sample_pos;
  float* temperature;
  float* top_p;
  uint64_t* seed;
};

// cuBLAS workspace of each of the engine's streams (matmul_bind_workspace): 32 MiB, as cuBLAS
// recommends for Hopper.
constexpr size_t kGemmWorkspaceBytes = size_t(32) << 20;

struct CudaEngine::Device {
  cudaStream_t stream = nullptr;
  // Two more streams for work beside the stream's own (graph branches in a capture): the K and V
  // projections beside Q's (a prompt's, and a step's below qkv_one_gemm_rows rows), and a step's
  // RoPE of the queries beside the cache's update. fork and joins order them; each of the three
  // streams has its own GEMM workspace.
  cudaStream_t kv_streams[2] = {nullptr, nullptr};
  cudaEvent_t fork = nullptr, joins[2] = {nullptr, nullptr};
  char* gemm_workspaces = nullptr;  // [3, kGemmWorkspaceBytes]: stream, kv_streams
  // Per input buffer (two, so that a step launched ahead fills one while the other's upload may
  // still wait on the stream): around its step's device work, the GPU's share of the step's
  // time (step_gpu_seconds); and after its outputs' copies, what Collect waits for.
  cudaEvent_t step_begin[2] = {nullptr, nullptr}, step_end[2] = {nullptr, nullptr};
  cudaEvent_t collected[2] = {nullptr, nullptr};
  bf16* weights = nullptr;
  std::vector<size_t> layer_offsets;  // [layer · kLayerTensors + tensor]
  size_t embed = 0, final_norm = 0, lm_head = 0;
  // The cache (kernels/paged_kv_write.h), all layers: tables [L, R, Hkv, max_pages], lengths and
  // window counts [L, R, Hkv], window [L, R, Hkv, w, 2D] and window_omega [L, R, Hkv, w].
  bf16 *k_pool = nullptr, *v_pool = nullptr;
  int32_t *page_table = nullptr, *lengths = nullptr, *window_count = nullptr;
  bf16* window = nullptr;
  float* window_omega = nullptr;
  // H2O and TOVA (kernels/paged_kv_evict.h): every slot's token position and H2O's accumulated
  // score, [pages, page_size] beside the pools (so both travel with their page, whatever row it
  // serves), and the step's attention weights [R, H, max_pages · page_size].
  int32_t* slot_pos = nullptr;
  float *scores = nullptr, *probs = nullptr;
  // DMS (kernels/paged_kv_dms_evict.h): every slot's mark, [pages, page_size] beside slot_pos; the
  // adapter's norm and projection offsets per layer; the step's decision input, logit and alpha
  // [3, R, Hkv] (its evictions go to merge) and the prefill's decision input [max_context, Hkv].
  uint8_t* marks = nullptr;
  std::vector<size_t> dms_adapter;  // [layer · 2 + (0 norm, 1 projection)]
  float *dms = nullptr, *pdms_x = nullptr;
  // Step activations, [R, ...]; qkv [R, (H + 2·Hkv)·D]: the step's queries, keys and values, as
  // one GEMM's rows over their adjacent weights (model::LayerTensor) or three GEMMs' packed blocks
  // (EnqueueStep).
  bf16 *x, *xn, *qkv, *qr, *att, *gate_up, *h;
  float *rstd, *merge, *omega, *logits;
  // Step inputs (device, and two pinned host buffers: in_host[0] serves prefills too), outputs.
  char* io_dev = nullptr;
  char* io_host = nullptr;  // [2, io_bytes]
  size_t io_bytes = 0;
  StepIo in_dev, in_host[2];
  int32_t *next, *argmax;
  float* logprob;
  // [3, R] next, argmax, logprob bits; then the host mirrors of lengths and (quantized) q_lengths
  // [L, R, Hkv] each.
  int32_t* out_host = nullptr;
  int32_t *lengths_host = nullptr, *q_lengths_host = nullptr;
  // Page bookkeeping (kernels/paged_kv_pages.h): pages in each head's table [L, R, Hkv], the
  // layers that write a cache (KVSharer; null: all), and in mapped host memory the rows' change
  // lists [R, L·Hkv], their counts, the rows' slots and spare pages [R].
  int32_t* held = nullptr;
  uint8_t* writes = nullptr;
  kernels::PageChange* changes_host = nullptr;
  int32_t *change_counts_host = nullptr, *row_slots_host = nullptr, *row_spare_host = nullptr;
  // Page hand-outs of a step.
  int64_t* assign_index = nullptr;
  int32_t* assign_page = nullptr;
  int64_t* assign_index_host = nullptr;
  int32_t* assign_page_host = nullptr;
  size_t assign_cap = 0;
  // Prefill activations, [max_context, ...].
  bf16 *px, *pxn, *pq, *pk, *pv, *pkhat, *pvhat, *pkr, *patt, *pgate_up, *ph;
  float *prstd, *pgates;  // gates: logit, alpha, merge, mask, omega, each [max_context, Hkv]
  int32_t* ptokens = nullptr;
  // KV quantization (kernels/kv_quant.h, kernels/paged_kv_settle.h): the quantized pages
  // [pages, layout bytes] (k_pool and v_pool stay null), every head's quantized slots [L, R, Hkv]
  // (lengths then count the residual's), the residual blocks [L, R, Hkv, residual_slots, D] (head
  // (row, h)'s is block row·Hkv + h of its layer: r_blocks is the identity [R·Hkv]), the
  // prefill's staging table (head (row, h) → h, its rows in pkr and pq) and the pages a step or a
  // prefill closes: page ids and gathered rows (per-token keys: the rows that settle, each with
  // its page id and row in the page, close_page_rows). DMS: slot_pos and marks are [L, R, Hkv,
  // residual_slots] beside the residual rows, the prefill's staged positions and marks
  // [Hkv, max_context], and a step's closing rows are staged in close_k, close_v [R, Hkv,
  // page_size, D]. ZipCache: the residual slots' scores [L, R, Hkv, residual_slots] and the
  // step's attention weights in probs.
  uint8_t* q_pages = nullptr;
  int32_t* q_lengths = nullptr;
  // ThinK (kernels/think_channels.h), settling as the quantized cache does (q_lengths then count
  // each head's slots in pruned pages): the pages' kept key channels [pages, page_size, kept],
  // their values [pages, page_size, D] and channel masks [pages, ceil(D / 8)], and every head's
  // query energy since its last page [L, R, Hkv, D].
  bf16 *think_k = nullptr, *think_v = nullptr;
  uint8_t* think_masks = nullptr;
  float* think_energy = nullptr;
  bf16 *r_k = nullptr, *r_v = nullptr;
  int32_t *r_blocks = nullptr, *stage_table = nullptr;
  int32_t *close_ids = nullptr, *close_rows = nullptr, *close_page_rows = nullptr;
  int32_t* stage_pos = nullptr;
  uint8_t* stage_marks = nullptr;
  bf16 *close_k = nullptr, *close_v = nullptr;
  int32_t* pprefix = nullptr;  // a chunk's cached slots per (query, KV head) [max_context, Hkv]
  // Step graphs by the rows they run: the steps of that number so far, and the graph once
  // captured (at the second).
  struct Graph {
    int steps = 0;
    cudaGraphExec_t exec = nullptr;
  };
  std::map<int, Graph> graphs;

  size_t W(int layer, LayerTensor t) const { return layer_offsets[layer * kLayerTensors + t]; }
};

CudaEngine::CudaEngine(const model::LlamaConfig& config, const CudaEngineOptions& options)
    : config_(config),
      opt_(options),
      cache_opt_(CacheOptionsFor(config, options.policy, options.budget_bytes,
                                 options.page_size)),
      alloc_(options.budget_bytes, KvPageBytes(cache_opt_, 2)),
      dev_(new Device) {}

CudaEngine::~CudaEngine() {
  if (!dev_) return;
  Device& d = *dev_;
  for (auto& [rows, g] : d.graphs)
    if (g.exec) cudaGraphExecDestroy(g.exec);
  for (void* p : {(void*)d.weights, (void*)d.k_pool, (void*)d.v_pool, (void*)d.page_table,
                  (void*)d.lengths, (void*)d.window_count, (void*)d.window, (void*)d.window_omega,
                  (void*)d.slot_pos, (void*)d.scores, (void*)d.probs, (void*)d.marks,
                  (void*)d.dms, (void*)d.pdms_x, (void*)d.x,
                  (void*)d.xn, (void*)d.qkv, (void*)d.qr, (void*)d.att,
                  (void*)d.gate_up, (void*)d.h, (void*)d.rstd, (void*)d.merge,
                  (void*)d.omega, (void*)d.logits, (void*)d.io_dev, (void*)d.next,
                  (void*)d.argmax, (void*)d.logprob, (void*)d.assign_index, (void*)d.assign_page,
                  (void*)d.px, (void*)d.pxn, (void*)d.pq, (void*)d.pk, (void*)d.pv,
                  (void*)d.pkhat, (void*)d.pvhat, (void*)d.pkr, (void*)d.patt, (void*)d.pgate_up,
                  (void*)d.ph, (void*)d.prstd, (void*)d.pgates, (void*)d.ptokens,
                  (void*)d.q_pages, (void*)d.q_lengths, (void*)d.r_k, (void*)d.r_v,
                  (void*)d.r_blocks, (void*)d.stage_table, (void*)d.close_ids,
                  (void*)d.close_rows, (void*)d.close_page_rows, (void*)d.pprefix,
                  (void*)d.stage_pos, (void*)d.stage_marks, (void*)d.close_k, (void*)d.close_v,
                  (void*)d.held, (void*)d.writes, (void*)d.think_k, (void*)d.think_v,
                  (void*)d.think_masks, (void*)d.think_energy})
    if (p) cudaFree(p);
  for (void* p : {(void*)d.io_host, (void*)d.out_host, (void*)d.assign_index_host,
                  (void*)d.assign_page_host, (void*)d.changes_host, (void*)d.change_counts_host,
                  (void*)d.row_slots_host, (void*)d.row_spare_host})
    if (p) cudaFreeHost(p);
  for (cudaEvent_t e : {d.step_begin[0], d.step_begin[1], d.step_end[0], d.step_end[1],
                        d.collected[0], d.collected[1], d.fork, d.joins[0], d.joins[1]})
    if (e) cudaEventDestroy(e);
  for (cudaStream_t s : {d.stream, d.kv_streams[0], d.kv_streams[1]})
    if (s) {
      c::matmul_bind_workspace(s, nullptr, 0);
      cudaStreamDestroy(s);
    }
  if (d.gemm_workspaces) cudaFree(d.gemm_workspaces);
}

absl::StatusOr<std::unique_ptr<CudaEngine>> CudaEngine::Create(const model::Llama<float>& model,
                                                               const CudaEngineOptions& options) {
  const model::LlamaConfig& cfg = model.config();
  const CacheMethod method = options.policy.method;
  if (!c::device_available())
    return absl::FailedPreconditionError("the GPU engine needs a CUDA device, and none is usable");
  if (model.local_heads() != cfg.num_attention_heads)
    return absl::InvalidArgumentError("the GPU engine needs a tensor-parallel size 1 model");
  if (absl::Status s = ValidatePageSize(options.page_size); !s.ok()) return s;
  const CachePolicy& policy = options.policy;
  const int D = cfg.head_dim();
  if (D != 32 && D != 64 && D != 128)
    return absl::InvalidArgumentError(absl::StrFormat(
        "the GPU engine needs head_dim 32, 64 or 128 (the attention kernels' sizes); this model "
        "has %d",
        D));
  // The quantized, ThinK and LoMA attentions tile 64 or 128 channels.
  const bool tiles_64 =
      policy.quant.bits > 0 || policy.think_channels > 0 || method == CacheMethod::kLoma;
  if (D == 32 && tiles_64)
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s on the GPU needs head_dim 64 or 128; this model has 32 (the bf16 cache of vanilla, "
        "dmc, dms, h2o and tova takes 32)",
        PolicyName(policy)));
  // As the CPU decoder: the loma method on a LoMA model only (whose config has DMC and DMS off).
  if (method == CacheMethod::kLoma && !cfg.loma.enabled())
    return absl::InvalidArgumentError(
        "the loma method needs a LoMA model (a config with \"loma\" settings)");
  // As the CPU decoder (PagedDecoder::Create): a DMS model and the dms cache go together.
  if ((method == CacheMethod::kDms) != cfg.dms.enabled)
    return absl::InvalidArgumentError(
        method == CacheMethod::kDms
            ? "the dms cache needs a DMS model with eviction on (config.json \"dms\")"
            : absl::StrFormat("a DMS model evicts by its own decisions: decode it with the dms "
                              "cache, not %s",
                              CacheMethodName(method)));
  if (absl::Status s = ValidateEvictionBudgets(policy, cfg.num_hidden_layers); !s.ok()) return s;
  if (absl::Status s = ValidateKvSharing(policy, cfg.num_hidden_layers); !s.ok()) return s;
  if (absl::Status s = ValidateThink(policy, cfg.head_dim()); !s.ok()) return s;
  if (absl::Status s = ValidateKvQuant(policy, cfg.head_dim(), options.page_size); !s.ok())
    return s;
  if (absl::Status s = ValidateGpuKvQuant(policy); !s.ok()) return s;
  if (method == CacheMethod::kDmc && !cfg.dmc.enabled)
    return absl::InvalidArgumentError(
        "the dmc method needs a DMC model (config.json with \"dmc\" enabled); this model has none: "
        "use the vanilla method");
  if (options.max_batch < 1 || options.page_size < 1)
    return absl::InvalidArgumentError(absl::StrFormat(
        "max_batch and page_size must be >= 1, got %d and %d", options.max_batch,
        options.page_size));
  if (options.attention_chunk < 0)
    return absl::InvalidArgumentError(absl::StrFormat(
        "attention_chunk must be >= 0 (0: chosen by each step's rows), got %d",
        options.attention_chunk));
  if (options.qkv_one_gemm_rows < CudaEngineOptions::kQkvOneGemmByMethod)
    return absl::InvalidArgumentError(absl::StrFormat(
        "qkv_one_gemm_rows must be >= -1 (-1: by the method, 0: Q, K and V always as three "
        "GEMMs), got %d",
        options.qkv_one_gemm_rows));
  const int max_context =
      options.max_context > 0 ? options.max_context : cfg.max_position_embeddings;
  if (max_context > cfg.max_position_embeddings)
    return absl::InvalidArgumentError(absl::StrFormat(
        "max_context %d exceeds the model's max_position_embeddings %d", max_context,
        cfg.max_position_embeddings));
  std::unique_ptr<CudaEngine> e(new CudaEngine(cfg, options));
  e->max_context_ = max_context;
  e->loma_ = method == CacheMethod::kLoma;
  // A LoMA head holds at most t more slots than tokens: at a compression, the full segment and
  // its t new memory slots (t·k + tc + t <= (k + 1)·tc + t).
  const int head_slots = max_context + (e->loma_ ? cfg.loma.zones.t : 0);
  e->max_pages_ = (head_slots + options.page_size - 1) / options.page_size;
  e->rows_ = options.max_batch + 1;  // one spare row for moves
  e->row_seq_.assign(e->rows_, -1);
  e->dmc_ = method == CacheMethod::kDmc;
  e->evicts_ = method == CacheMethod::kH2O || method == CacheMethod::kTova;
  e->dms_ = method == CacheMethod::kDms;
  if (options.qkv_one_gemm_rows == CudaEngineOptions::kQkvOneGemmByMethod)
    e->opt_.qkv_one_gemm_rows = e->dmc_ || e->dms_ ? CudaEngineOptions::kQkvOneGemmLearnedRows : 0;
  e->dms_qchannel_ = e->dms_ && cfg.dms.variant == model::DmsVariant::kQueryChannel;
  e->shape_ = {cfg.hidden_size,
               cfg.num_attention_heads,
               cfg.num_key_value_heads,
               cfg.head_dim(),
               cfg.vocab_size,
               cfg.rope_theta,
               cfg.rms_norm_eps,
               1.0f / std::sqrt(static_cast<float>(cfg.head_dim())),
               {cfg.dmc.init_val, cfg.dmc.temperature, cfg.dmc.omega_eps,
                kernels::DmcDecisionMode::kHard},
               {cfg.dms.scale, cfg.dms.offset, cfg.dms.temperature,
                kernels::DmcDecisionMode::kHard}};
  e->keep_ctrl_ = cfg.dmc.enabled;
  e->quant_ = KvQuantized(e->cache_opt_);
  e->think_ = KvThink(e->cache_opt_);
  e->settles_ = KvSettles(e->cache_opt_);
  e->slots_settle_ = KvSettlesSlots(e->cache_opt_);
  e->zip_ = policy.quant.salient_slots > 0;
  if (e->quant_)
    e->layout_ = kernels::kv_quant_page_layout(policy.quant, options.page_size, cfg.head_dim());
  if (e->settles_) e->residual_slots_ = KvResidualSlots(e->cache_opt_);
  try {
    e->Upload(model);
  } catch (const std::runtime_error& err) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "the GPU engine could not allocate its buffers (budget %d bytes, max_batch %d, "
        "max_context %d): %s",
        options.budget_bytes, options.max_batch, max_context, err.what()));
  }
  return e;
}

void CudaEngine::Upload(const model::Llama<float>& model) {
  Device& d = *dev_;
  const model::LlamaConfig& cfg = config_;
  const int L = cfg.num_hidden_layers, C = cfg.hidden_size, H = cfg.num_attention_heads;
  const int Hkv = cfg.num_key_value_heads, D = cfg.head_dim(), F = cfg.intermediate_size;
  const int V = cfg.vocab_size, R = rows_, P = max_context_;
  ENGINE_CUDA(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking));
  for (int b = 0; b < 2; ++b) {
    ENGINE_CUDA(cudaEventCreate(&d.step_begin[b]));
    ENGINE_CUDA(cudaEventCreate(&d.step_end[b]));
    ENGINE_CUDA(cudaEventCreateWithFlags(&d.collected[b], cudaEventDisableTiming));
  }
  ENGINE_CUDA(cudaEventCreateWithFlags(&d.fork, cudaEventDisableTiming));
  d.gemm_workspaces = Alloc<char>(3 * kGemmWorkspaceBytes);
  c::matmul_bind_workspace(d.stream, d.gemm_workspaces, kGemmWorkspaceBytes);
  for (int i = 0; i < 2; ++i) {
    ENGINE_CUDA(cudaStreamCreateWithFlags(&d.kv_streams[i], cudaStreamNonBlocking));
    ENGINE_CUDA(cudaEventCreateWithFlags(&d.joins[i], cudaEventDisableTiming));
    c::matmul_bind_workspace(d.kv_streams[i], d.gemm_workspaces + (i + 1) * kGemmWorkspaceBytes,
                             kGemmWorkspaceBytes);
  }

  // Weights: the host layout, converted to bf16 through a staging buffer.
  size_t num_params = 0;
  for (const auto& s : model.param_specs()) num_params = std::max(num_params, s.offset + s.size);
  auto offset_of = [&](const std::string& name) { return model.FindParam(name)->offset; };
  d.embed = offset_of("model.embed_tokens.weight");
  d.layer_offsets = model.layer_offsets();
  if (dms_ && !dms_qchannel_)
    for (int l = 0; l < L; ++l) {
      const std::string p = absl::StrFormat("model.layers.%d.self_attn.", l);
      d.dms_adapter.push_back(offset_of(p + "dms_proj_alpha_norm.weight"));
      d.dms_adapter.push_back(offset_of(p + "dms_proj_alpha.weight"));
    }
  d.final_norm = offset_of("model.norm.weight");
  d.lm_head = cfg.tie_word_embeddings ? d.embed : offset_of("lm_head.weight");
  d.weights = Alloc<bf16>(num_params);
  {
    const size_t chunk = 64u << 20;
    float* staging = Alloc<float>(std::min(chunk, num_params));
    for (size_t at = 0; at < num_params; at += chunk) {
      const size_t n = std::min(chunk, num_params - at);
      ENGINE_CUDA(cudaMemcpyAsync(staging, model.params().data() + at, n * sizeof(float),
                                  cudaMemcpyHostToDevice, d.stream));
      model::cuda_model_detail::to_bf16(d.weights + at, staging, n, d.stream);
    }
    ENGINE_CUDA(cudaStreamSynchronize(d.stream));
    ENGINE_CUDA(cudaFree(staging));
  }

  // The cache: as many pages as the budget pays for (window state reserved from the same budget
  // lives in its own per-row buffer), then the padding rows' sink page (StepRows).
  sink_page_ = static_cast<int32_t>(std::max(1L, alloc_.budget_bytes() / alloc_.page_bytes()));
  const size_t pages = static_cast<size_t>(sink_page_) + 1;
  const size_t page_elems = static_cast<size_t>(opt_.page_size) * D;
  const size_t heads = static_cast<size_t>(L) * R * Hkv;
  if (settles_) {
    if (quant_) {
      d.q_pages = Alloc<uint8_t>(pages * layout_.bytes);
    } else {
      d.think_k = Alloc<bf16>(pages * opt_.page_size * cache_opt_.think_channels);
      d.think_v = Alloc<bf16>(pages * page_elems);
      d.think_masks = Alloc<uint8_t>(pages * kernels::ThinkMaskBytes(D));
      d.think_energy = Alloc<float>(heads * D);
      ENGINE_CUDA(cudaMemset(d.think_energy, 0, heads * D * sizeof(float)));
    }
    d.q_lengths = Alloc<int32_t>(heads);
    ENGINE_CUDA(cudaMemset(d.q_lengths, 0, heads * sizeof(int32_t)));
    d.r_k = Alloc<bf16>(heads * residual_slots_ * D);
    d.r_v = Alloc<bf16>(heads * residual_slots_ * D);
    std::vector<int32_t> blocks(size_t(R) * Hkv), stage(size_t(R) * Hkv);
    for (size_t i = 0; i < blocks.size(); ++i) {
      blocks[i] = static_cast<int32_t>(i);
      stage[i] = static_cast<int32_t>(i % Hkv);
    }
    d.r_blocks = Alloc<int32_t>(blocks.size());
    d.stage_table = Alloc<int32_t>(stage.size());
    ENGINE_CUDA(cudaMemcpy(d.r_blocks, blocks.data(), blocks.size() * sizeof(int32_t),
                           cudaMemcpyHostToDevice));
    ENGINE_CUDA(cudaMemcpy(d.stage_table, stage.data(), stage.size() * sizeof(int32_t),
                           cudaMemcpyHostToDevice));
    // A step closes at most one page per head of its rows, a prefill at most max_pages per head;
    // a slot at a time, a step settles one row per head, a prefill max_pages pages of rows.
    const size_t lists = std::max(size_t(R) * Hkv, size_t(Hkv) * max_pages_);
    d.close_ids = Alloc<int32_t>(slots_settle_ ? lists * opt_.page_size : lists);
    d.close_rows = Alloc<int32_t>(lists * opt_.page_size);
    if (slots_settle_) d.close_page_rows = Alloc<int32_t>(lists * opt_.page_size);
    if (dms_) {
      d.stage_pos = Alloc<int32_t>(size_t(Hkv) * P);
      d.stage_marks = Alloc<uint8_t>(size_t(Hkv) * P);
      d.close_k = Alloc<bf16>(size_t(R) * Hkv * page_elems);
      d.close_v = Alloc<bf16>(size_t(R) * Hkv * page_elems);
    }
  } else {
    d.k_pool = Alloc<bf16>(pages * page_elems);
    d.v_pool = Alloc<bf16>(pages * page_elems);
  }
  d.page_table = Alloc<int32_t>(heads * max_pages_);
  d.lengths = Alloc<int32_t>(heads);
  d.window_count = Alloc<int32_t>(heads);
  d.held = Alloc<int32_t>(heads);
  ENGINE_CUDA(cudaMemset(d.page_table, 0, heads * max_pages_ * sizeof(int32_t)));
  for (int32_t* a : {d.lengths, d.window_count, d.held})
    ENGINE_CUDA(cudaMemset(a, 0, heads * sizeof(int32_t)));
  if (!opt_.policy.kv_source.empty()) {
    std::vector<uint8_t> writes(L);
    for (int l = 0; l < L; ++l) writes[l] = KvSourceLayer(opt_.policy, l) == l;
    d.writes = Alloc<uint8_t>(L);
    ENGINE_CUDA(cudaMemcpy(d.writes, writes.data(), L, cudaMemcpyHostToDevice));
  }
  ENGINE_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&d.changes_host),
                            heads * sizeof(kernels::PageChange), cudaHostAllocMapped));
  for (int32_t** a : {&d.change_counts_host, &d.row_slots_host, &d.row_spare_host})
    ENGINE_CUDA(cudaHostAlloc(reinterpret_cast<void**>(a), R * sizeof(int32_t), cudaHostAllocMapped));
  if (cache_opt_.dmc_window > 0) {
    d.window = Alloc<bf16>(heads * cache_opt_.dmc_window * 2 * D);
    d.window_omega = Alloc<float>(heads * cache_opt_.dmc_window);
  }
  // Per slot of the pages, or (settling) of the residual blocks.
  const size_t slots = settles_ ? heads * residual_slots_ : pages * opt_.page_size;
  if (evicts_ || dms_) d.slot_pos = Alloc<int32_t>(slots);
  if (dms_) {
    d.marks = Alloc<uint8_t>(slots);
    d.dms = Alloc<float>(size_t(3) * R * Hkv);
    d.pdms_x = Alloc<float>(size_t(P) * Hkv);
  }
  if (evicts_) {
    if (opt_.policy.method == CacheMethod::kH2O) d.scores = Alloc<float>(pages * opt_.page_size);
    d.probs = Alloc<float>(size_t(R) * H * max_pages_ * opt_.page_size);
  }
  if (zip_) {
    d.scores = Alloc<float>(heads * residual_slots_);
    d.probs = Alloc<float>(size_t(R) * H * ProbsStride());
  }

  d.x = Alloc<bf16>(size_t(R) * C);
  d.xn = Alloc<bf16>(size_t(R) * C);
  d.qkv = Alloc<bf16>(size_t(R) * (H + 2 * Hkv) * D);
  d.qr = Alloc<bf16>(size_t(R) * H * D);
  d.att = Alloc<bf16>(size_t(R) * H * D);
  d.gate_up = Alloc<bf16>(size_t(R) * 2 * F);
  d.h = Alloc<bf16>(size_t(R) * F);
  d.rstd = Alloc<float>(R);
  d.merge = Alloc<float>(size_t(R) * Hkv);
  d.omega = Alloc<float>(size_t(R) * Hkv);
  d.logits = Alloc<float>(size_t(R) * V);
  d.next = Alloc<int32_t>(R);
  d.argmax = Alloc<int32_t>(R);
  d.logprob = Alloc<float>(R);
  // Inputs: 4 int32 arrays, 2 float, 1 uint64, each padded to 8 bytes per row.
  d.io_bytes = size_t(R) * 8 * 7;
  d.io_dev = Alloc<char>(d.io_bytes);
  ENGINE_CUDA(cudaMallocHost(reinterpret_cast<void**>(&d.io_host), 2 * d.io_bytes));
  auto carve = [&](char* base) {
    StepIo io;
    io.tokens = reinterpret_cast<int32_t*>(base);
    io.positions = reinterpret_cast<int32_t*>(base + size_t(R) * 8);
    io.targets = reinterpret_cast<int32_t*>(base + size_t(R) * 16);
    io.sample_pos = reinterpret_cast<int32_t*>(base + size_t(R) * 24);
    io.temperature = reinterpret_cast<float*>(base + size_t(R) * 32);
    io.top_p = reinterpret_cast<float*>(base + size_t(R) * 40);
    io.seed = reinterpret_cast<uint64_t*>(base + size_t(R) * 48);
    return io;
  };
  d.in_dev = carve(d.io_dev);
  for (int b = 0; b < 2; ++b) d.in_host[b] = carve(d.io_host + b * d.io_bytes);
  // Outputs: next, argmax, logprob [R] each, the mirrors [L, R, Hkv] each.
  ENGINE_CUDA(cudaMallocHost(reinterpret_cast<void**>(&d.out_host),
                             (3 * size_t(R) + 2 * heads) * sizeof(int32_t)));
  std::fill_n(d.out_host, 3 * size_t(R) + 2 * heads, 0);
  d.lengths_host = d.out_host + 3 * size_t(R);
  d.q_lengths_host = d.lengths_host + heads;
  // A step hands out at most a page per head of every row (a LoMA compression's t slots at most
  // ceil(t / page_size)), a prefill of up to max_context tokens at most max_pages per head of its
  // row.
  const int per_row = loma_ ? (cfg.loma.zones.t + opt_.page_size - 1) / opt_.page_size : 1;
  d.assign_cap =
      static_cast<size_t>(L) * Hkv * std::max<size_t>(size_t(R) * per_row, max_pages_);
  d.assign_index = Alloc<int64_t>(d.assign_cap);
  d.assign_page = Alloc<int32_t>(d.assign_cap);
  ENGINE_CUDA(cudaMallocHost(reinterpret_cast<void**>(&d.assign_index_host), d.assign_cap * sizeof(int64_t)));
  ENGINE_CUDA(cudaMallocHost(reinterpret_cast<void**>(&d.assign_page_host), d.assign_cap * sizeof(int32_t)));

  d.px = Alloc<bf16>(size_t(P) * C);
  d.pxn = Alloc<bf16>(size_t(P) * C);
  d.pq = Alloc<bf16>(size_t(P) * H * D);
  d.patt = Alloc<bf16>(size_t(P) * H * D);
  for (bf16** b : {&d.pk, &d.pv, &d.pkhat, &d.pvhat, &d.pkr}) *b = Alloc<bf16>(size_t(P) * Hkv * D);
  d.pgate_up = Alloc<bf16>(size_t(P) * 2 * F);
  d.ph = Alloc<bf16>(size_t(P) * F);
  d.prstd = Alloc<float>(P);
  d.pgates = Alloc<float>(size_t(5) * P * Hkv);
  d.ptokens = Alloc<int32_t>(P);
  d.pprefix = Alloc<int32_t>(size_t(P) * Hkv);
  // The attention's scratch at its largest now, so that no step moves it under a captured graph.
  // (Quantized: the residual's rows after the pages.)
  const int residual_pages = (residual_slots_ + opt_.page_size - 1) / opt_.page_size;
  // Chosen by rows, a smaller step may take a shorter chunk, and so more partials, than R rows:
  // the reserve covers the step with the most.
  int most_rows = R;
  long most_partials = 0;
  const long head_slots = static_cast<long>(max_pages_ + residual_pages) * opt_.page_size;
  for (int rows = 1; rows <= R; ++rows) {
    const long chunk = AttentionChunk(rows);
    if (const long partials = rows * ((head_slots + chunk - 1) / chunk); partials >= most_partials)
      most_rows = rows, most_partials = partials;
  }
  c::paged_decode_attention_reserve(most_rows, H, D, max_pages_ + residual_pages, opt_.page_size,
                                    AttentionChunk(most_rows));
  c::matmul_reserve(d.stream);
}

// On an H100 (132 SMs; bench/RESULTS.md entry 34) 128 slots ran one or a few rows 1-2% faster
// than 256 and 5-6% faster than 512 (1B and 7B shapes, one row: 4 and 32 pairs), 128 and 256
// were even at 8 rows of the 7B (256 pairs), and at 178-323 rows of the 1B (712-1,292 pairs)
// 512 shortened the DMC steps by 4%, its short heads then one CTA and no merge.
int CudaEngine::AttentionChunk(int rows) const {
  if (opt_.attention_chunk > 0) return opt_.attention_chunk;
  const long pairs = static_cast<long>(rows) * config_.num_key_value_heads;
  const long sms = c::detail::num_sms();
  return pairs < sms ? 128 : pairs < 4 * sms ? 256 : 512;
}

absl::Status CudaEngine::AddSequence(int seq, const SamplingOptions& sampling) {
  if (absl::Status s = NoStepOut("an admission"); !s.ok()) return s;
  if (seqs_.count(seq))
    return absl::AlreadyExistsError(absl::StrFormat("sequence %d is already in the cache", seq));
  const long heads = static_cast<long>(config_.num_hidden_layers) * config_.num_key_value_heads;
  const long reserved = ReservedBytes();
  const long first_pages = settles_ ? 0 : heads;  // settling: the residual holds the first token
  const long need = reserved + first_pages * alloc_.page_bytes();
  if (need > alloc_.free_bytes())
    return absl::ResourceExhaustedError(absl::StrFormat(
        "KV cache budget of %d bytes cannot admit sequence %d: its first token needs %d bytes, "
        "%d of %d bytes are in use by %d sequences",
        alloc_.budget_bytes(), seq, need, alloc_.used_bytes(), alloc_.budget_bytes(),
        num_sequences()));
  if (num_sequences() >= opt_.max_batch)
    return absl::ResourceExhaustedError(absl::StrFormat(
        "the GPU engine holds max_batch %d sequences already", opt_.max_batch));
  if (absl::Status s = alloc_.Reserve(reserved); !s.ok()) return s;
  Sequence& sq = seqs_[seq];
  sq.row = static_cast<int>(std::find(row_seq_.begin(), row_seq_.end() - 1, -1) - row_seq_.begin());
  row_seq_[sq.row] = seq;
  sq.sampling = sampling;
  sq.pages.assign(heads, {});
  // Empty heads: the first token needs a page in every head that writes (quantized: none, the
  // residual holds it).
  const int Hkv = config_.num_key_value_heads, L = config_.num_hidden_layers;
  for (int i = 0; i < heads; ++i) {
    const bool writes = KvSourceLayer(opt_.policy, i / Hkv) == i / Hkv;
    const int grow = !writes       ? 0
                     : slots_settle_ ? kernels::KvSlotPagesToGrow(0, 0, 1, opt_.page_size)
                                     : kernels::KvPagesToGrow(0, 0, 1, opt_.page_size, settles_);
    if (grow > 0) sq.growth.emplace_back(i, grow);
    sq.growth_pages += grow;
  }
  sq.spare_pages = sq.growth_pages;  // the first token's worst case; nothing is kept yet
  // The row starts empty on the device (lengths, window counts and pages of every layer) and in
  // the host's mirror.
  Device& d = *dev_;
  const size_t R = rows_;
  for (int32_t* a : {d.lengths, d.window_count, d.held, d.q_lengths})
    if (a)
      ENGINE_CUDA(cudaMemset2DAsync(a + sq.row * Hkv, R * Hkv * sizeof(int32_t), 0,
                                    Hkv * sizeof(int32_t), L, d.stream));
  for (int l = 0; l < L; ++l)
    for (int32_t* mirror : {d.lengths_host, d.q_lengths_host})
      std::fill_n(mirror + (l * R + sq.row) * Hkv, Hkv, 0);
  // ThinK: no query observed yet.
  const size_t energy_row = static_cast<size_t>(Hkv) * config_.head_dim();
  if (think_)
    ENGINE_CUDA(cudaMemset2DAsync(d.think_energy + sq.row * energy_row,
                                  R * energy_row * sizeof(float), 0, energy_row * sizeof(float), L,
                                  d.stream));
  return absl::OkStatus();
}

absl::Status CudaEngine::Free(int seq) {
  if (absl::Status s = NoStepOut("a release"); !s.ok()) return s;
  auto it = seqs_.find(seq);
  if (it == seqs_.end())
    return absl::NotFoundError(absl::StrFormat("free of sequence %d, which is not in the cache", seq));
  for (const auto& head : it->second.pages)
    for (int32_t page : head)
      if (absl::Status s = alloc_.Free(page); !s.ok()) return s;
  if (absl::Status s = alloc_.Release(ReservedBytes()); !s.ok()) return s;
  const int row = it->second.row;
  row_seq_[row] = -1;
  seqs_.erase(it);
  // Keep the rows dense: the highest used row moves into the hole.
  int last = -1;
  for (int r = 0; r < rows_ - 1; ++r)
    if (row_seq_[r] >= 0) last = r;
  if (last > row) MoveRow(last, row);
  return absl::OkStatus();
}

void CudaEngine::MoveRow(int from, int to) {
  Device& d = *dev_;
  const size_t L = config_.num_hidden_layers, Hkv = config_.num_key_value_heads, R = rows_;
  const size_t table = Hkv * max_pages_ * sizeof(int32_t), heads = Hkv * sizeof(int32_t);
  auto move = [&](void* base, size_t row_bytes) {
    char* b = static_cast<char*>(base);
    ENGINE_CUDA(cudaMemcpy2DAsync(b + to * row_bytes, R * row_bytes, b + from * row_bytes,
                                  R * row_bytes, row_bytes, L, cudaMemcpyDeviceToDevice,
                                  d.stream));
  };
  move(d.page_table, table);
  move(d.lengths, heads);
  move(d.window_count, heads);
  move(d.held, heads);
  for (size_t l = 0; l < L; ++l)
    for (int32_t* mirror : {d.lengths_host, d.q_lengths_host})
      std::copy_n(mirror + (l * R + from) * Hkv, Hkv, mirror + (l * R + to) * Hkv);
  if (d.window) {
    move(d.window, Hkv * cache_opt_.dmc_window * 2 * config_.head_dim() * sizeof(bf16));
    move(d.window_omega, Hkv * cache_opt_.dmc_window * sizeof(float));
  }
  if (settles_) {
    move(d.q_lengths, heads);
    move(d.r_k, Hkv * residual_slots_ * config_.head_dim() * sizeof(bf16));
    move(d.r_v, Hkv * residual_slots_ * config_.head_dim() * sizeof(bf16));
    // The residual slots' state: DMS's positions and marks, ZipCache's scores.
    if (d.slot_pos) move(d.slot_pos, Hkv * residual_slots_ * sizeof(int32_t));
    if (d.marks) move(d.marks, Hkv * residual_slots_ * sizeof(uint8_t));
    if (d.scores) move(d.scores, Hkv * residual_slots_ * sizeof(float));
    if (think_) move(d.think_energy, Hkv * config_.head_dim() * sizeof(float));
  }
  const int seq = row_seq_[from];
  row_seq_[to] = seq;
  row_seq_[from] = -1;
  if (seq >= 0) seqs_.at(seq).row = to;
}

void CudaEngine::ArrangeRows(const std::vector<int>& seqs) {
  const int n = static_cast<int>(seqs.size()), spare = rows_ - 1;
  std::vector<bool> stepped(rows_, false);
  for (int seq : seqs) stepped[seqs_.at(seq).row] = true;
  for (int seq : seqs) {
    const int row = seqs_.at(seq).row;
    if (row < n) continue;
    // A row below n that is not stepped (or free) takes this one's place: swap through the spare.
    int hole = 0;
    while (stepped[hole]) ++hole;
    stepped[hole] = true;
    stepped[row] = false;
    if (row_seq_[hole] >= 0) MoveRow(hole, spare);
    MoveRow(row, hole);
    if (row_seq_[spare] >= 0) MoveRow(spare, row);
  }
}

absl::Status CudaEngine::CanStep(const std::vector<int>& seqs) const {
  long pages = 0;
  for (int seq : seqs) pages += seqs_.at(seq).growth_pages + LomaCompressionPages(seq);
  if (pages > alloc_.free_pages())
    return absl::ResourceExhaustedError(absl::StrFormat(
        "the next step may need %d more KV pages; the budget of %d bytes has %d free", pages,
        alloc_.budget_bytes(), alloc_.free_pages()));
  return absl::OkStatus();
}

long CudaEngine::LomaCompressionPages(int seq) const {
  const Sequence& s = seqs_.at(seq);
  const kernels::LomaZones& z = config_.loma.zones;
  if (!loma_ || (s.tokens + 1) % z.segment() != 0) return 0;
  // Every head holds the same slots (each appends every token and compresses with the others).
  const long heads = static_cast<long>(config_.num_hidden_layers) * config_.num_key_value_heads;
  const int after_step = static_cast<int>(s.slots / heads) + 1;
  return heads * (kernels::KvPagesToGrow(after_step, 0, z.t, opt_.page_size, false) -
                  kernels::KvPagesKept(after_step, 0, opt_.page_size, false));
}

absl::Status CudaEngine::GrowPages(const std::vector<int>& seqs) {
  Device& d = *dev_;
  const int Hkv = config_.num_key_value_heads;
  int n = 0;
  for (int seq : seqs) {
    Sequence& s = seqs_.at(seq);
    for (auto [i, count] : s.growth)
      for (int j = 0; j < count; ++j) {
        absl::StatusOr<int32_t> page = alloc_.Allocate();
        if (!page.ok()) return page.status();
        const int layer = i / Hkv, h = i % Hkv;
        d.assign_index_host[n] =
            ((static_cast<int64_t>(layer) * rows_ + s.row) * Hkv + h) * max_pages_ +
            static_cast<int64_t>(s.pages[i].size());
        d.assign_page_host[n++] = *page;
        s.pages[i].push_back(*page);
        ++s.num_pages;
      }
    s.growth.clear();
    s.growth_pages = 0;
  }
  if (n == 0) return absl::OkStatus();
  // The pinned lists are next rewritten after the step's (or prefill's) synchronisation.
  ENGINE_CUDA(cudaMemcpyAsync(d.assign_index, d.assign_index_host, n * sizeof(int64_t),
                              cudaMemcpyHostToDevice, d.stream));
  ENGINE_CUDA(cudaMemcpyAsync(d.assign_page, d.assign_page_host, n * sizeof(int32_t),
                              cudaMemcpyHostToDevice, d.stream));
  c::paged_kv_assign_pages(d.page_table, d.held, d.assign_index, d.assign_page, n, max_pages_,
                           d.stream);
  return absl::OkStatus();
}

void CudaEngine::EnqueuePageChanges(int row0, int n, int tokens) {
  Device& d = *dev_;
  const int L = config_.num_hidden_layers, Hkv = config_.num_key_value_heads;
  const kernels::PagedKvPages pages{d.lengths, d.q_lengths,    d.writes,      d.held, L,
                                    rows_,     Hkv,            opt_.page_size, slots_settle_};
  c::paged_kv_page_changes(pages, row0, n, tokens, d.changes_host, d.change_counts_host,
                           d.row_slots_host, d.row_spare_host, d.stream);
}

void CudaEngine::EnqueueCopyBack(int row0, int n) {
  Device& d = *dev_;
  const size_t pitch = static_cast<size_t>(rows_) * config_.num_key_value_heads * sizeof(int32_t);
  const size_t at = static_cast<size_t>(row0) * config_.num_key_value_heads;
  for (auto [to, from] : {std::pair{d.lengths_host, d.lengths}, std::pair{d.q_lengths_host, d.q_lengths}})
    if (from)
      ENGINE_CUDA(cudaMemcpy2DAsync(to + at, pitch, from + at, pitch,
                                    n * config_.num_key_value_heads * sizeof(int32_t),
                                    config_.num_hidden_layers, cudaMemcpyDeviceToHost, d.stream));
}

absl::Status CudaEngine::ApplyPageChanges(int row0, int n) {
  Device& d = *dev_;
  const size_t heads = static_cast<size_t>(config_.num_hidden_layers) * config_.num_key_value_heads;
  for (int j = 0; j < n; ++j) {
    Sequence& s = seqs_.at(row_seq_[row0 + j]);
    s.slots = d.row_slots_host[j];
    s.spare_pages = d.row_spare_host[j];
    s.growth.clear();
    s.growth_pages = 0;
    const kernels::PageChange* list = d.changes_host + j * heads;
    for (int k = 0; k < d.change_counts_host[j]; ++k) {
      const auto [i, trim, grow] = list[k];
      std::vector<int32_t>& pages = s.pages[i];
      for (int t = 0; t < trim; ++t) {
        if (absl::Status st = alloc_.Free(pages.back()); !st.ok()) return st;
        pages.pop_back();
        --s.num_pages;
      }
      if (grow > 0) s.growth.emplace_back(i, grow);
      s.growth_pages += grow;
    }
  }
  return absl::OkStatus();
}

absl::Status CudaEngine::Validate(int seq, int32_t token) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end())
    return absl::NotFoundError(absl::StrFormat("sequence %d is not in the cache", seq));
  if (it->second.tokens >= max_context_)
    return absl::OutOfRangeError(absl::StrFormat(
        "sequence %d is full: the engine's context is %d tokens", seq, max_context_));
  if (token < 0 || token >= config_.vocab_size)
    return absl::InvalidArgumentError(absl::StrFormat(
        "token id %d is outside the vocabulary [0, %d)", token, config_.vocab_size));
  return absl::OkStatus();
}

namespace {

kernels::SampleRows RowsOf(const StepIo& io) {
  return {io.temperature, io.top_p, io.seed, io.sample_pos, io.targets};
}

// Layer l's eviction: its own budget under per-layer budgets (LayerBudget), as on the CPU.
kernels::EvictPolicy EvictPolicyOf(const CachePolicy& policy, int layer) {
  return {policy.method == CacheMethod::kH2O ? kernels::EvictRule::kH2O : kernels::EvictRule::kTova,
          LayerBudget(policy, layer), LayerRecent(policy, layer)};
}

}  // namespace

c::PagedKv CudaEngine::CacheLayer(int l) const {
  const Device& d = *dev_;
  const size_t head0 = static_cast<size_t>(l) * rows_ * config_.num_key_value_heads;
  c::PagedKv layer;
  layer.k_pool = d.k_pool;
  layer.v_pool = d.v_pool;
  layer.page_table = d.page_table + head0 * max_pages_;
  layer.lengths = d.lengths + head0;
  if (d.window) {
    layer.window = d.window + head0 * cache_opt_.dmc_window * 2 * config_.head_dim();
    layer.window_omega = d.window_omega + head0 * cache_opt_.dmc_window;
  }
  layer.window_count = d.window_count + head0;
  layer.slot_pos = d.slot_pos;
  layer.max_pages = max_pages_;
  layer.page_size = opt_.page_size;
  layer.window_size = cache_opt_.dmc_window;
  if (settles_) {
    const size_t block = static_cast<size_t>(residual_slots_) * config_.head_dim();
    layer.k_pool = d.r_k + head0 * block;
    layer.v_pool = d.r_v + head0 * block;
    layer.slot_pos = d.slot_pos ? d.slot_pos + head0 * residual_slots_ : nullptr;
    layer.page_table = d.r_blocks;
    layer.max_pages = 1;
    layer.page_size = residual_slots_;
  }
  return layer;
}

kernels::KvSettleLayer CudaEngine::SettleLayer(int l) const {
  const Device& d = *dev_;
  const size_t head0 = static_cast<size_t>(l) * rows_ * config_.num_key_value_heads;
  const size_t slot0 = head0 * residual_slots_;
  return {d.page_table + head0 * max_pages_, d.q_lengths + head0, d.lengths + head0, max_pages_,
          opt_.page_size, residual_slots_, cache_opt_.settle_lag,
          d.slot_pos ? d.slot_pos + slot0 : nullptr, d.marks ? d.marks + slot0 : nullptr,
          d.scores ? d.scores + slot0 : nullptr, slots_settle_};
}

float* CudaEngine::ThinkEnergy(int l) const {
  return dev_->think_energy +
         static_cast<size_t>(l) * rows_ * config_.num_key_value_heads * config_.head_dim();
}

uint8_t* CudaEngine::Marks(int l) const {
  const size_t head0 = static_cast<size_t>(l) * rows_ * config_.num_key_value_heads;
  return dev_->marks + (settles_ ? head0 * residual_slots_ : 0);
}

void CudaEngine::EnqueueMlp(int l, int rows, bf16* x, bf16* xn, float* rstd, bf16* gate_up,
                            bf16* h) {
  const Device& d = *dev_;
  const int C = config_.hidden_size, F = config_.intermediate_size;
  const bf16* w = d.weights;
  cudaStream_t st = d.stream;
  c::rmsnorm_forward(xn, rstd, x, w + d.W(l, kMlpNorm), rows, C, config_.rms_norm_eps, st);
  // gate and up as one GEMM over their adjacent weight rows [2F, C] (model::LayerTensor).
  c::matmul_forward(gate_up, xn, w + d.W(l, kGate), rows, C, 2 * F, st);
  c::swiglu_forward(h, gate_up, gate_up + F, rows, F, 2 * F, st);
  c::matmul_forward_add(x, h, w + d.W(l, kDown), rows, F, C, st);
}

void CudaEngine::EnqueueQkv(int l, int rows, const bf16* x, bf16* xn, float* rstd, bf16* q,
                            bf16* k, bf16* v, long qkv_ld) {
  const Device& d = *dev_;
  const int C = config_.hidden_size, H = config_.num_attention_heads,
            Hkv = config_.num_key_value_heads, D = config_.head_dim();
  const bf16* w = d.weights;
  cudaStream_t st = d.stream;
  c::rmsnorm_forward(xn, rstd, x, w + d.W(l, kAttnNorm), rows, C, config_.rms_norm_eps, st);
  if (qkv_ld > 0) {  // Wq, Wk and Wv are adjacent: one [C, (H + 2·Hkv)·D] product
    c::matmul_forward(q, xn, w + d.W(l, kWq), rows, C, static_cast<int>(qkv_ld), st);
    return;
  }
  ENGINE_CUDA(cudaEventRecord(d.fork, st));
  for (cudaStream_t kv : d.kv_streams) ENGINE_CUDA(cudaStreamWaitEvent(kv, d.fork));
  c::matmul_forward(k, xn, w + d.W(l, kWk), rows, C, Hkv * D, d.kv_streams[0]);
  c::matmul_forward(v, xn, w + d.W(l, kWv), rows, C, Hkv * D, d.kv_streams[1]);
  c::matmul_forward(q, xn, w + d.W(l, kWq), rows, C, H * D, st);
  for (int i = 0; i < 2; ++i) {
    ENGINE_CUDA(cudaEventRecord(d.joins[i], d.kv_streams[i]));
    ENGINE_CUDA(cudaStreamWaitEvent(st, d.joins[i]));
  }
}

void CudaEngine::EnqueueDmsDecisions(int l, int rows, const bf16* x, bf16* q, long q_ld,
                                     bf16* xn, float* rstd, float* input, float* logit,
                                     float* alpha, float* evict, float* mask) {
  const Device& d = *dev_;
  const auto& [C, H, Hkv, D, V, theta, eps, scale, gates, dms_gates] = shape_;
  cudaStream_t st = d.stream;
  if (dms_qchannel_) {
    model::cuda_model_detail::get_dms_query_channel(input, q, rows, H, Hkv, D, st, q_ld);
    model::cuda_model_detail::set_dms_query_channel(q, nullptr, rows, H, Hkv, D, st, q_ld);
  } else {
    const bf16* w = d.weights;
    c::rmsnorm_forward(xn, rstd, x, w + d.dms_adapter[2 * l], rows, C, eps, st);
    c::matmul_forward_f32(input, xn, w + d.dms_adapter[2 * l + 1], rows, C, Hkv, st);
  }
  // The rows as one sequence: only the mask reads across positions, and a step passes none.
  c::dms_gates_forward(logit, alpha, evict, mask, input, nullptr, 1, rows, Hkv, dms_gates, st);
}

void CudaEngine::EnqueueStep(int n) {
  Device& d = *dev_;
  const auto& [C, H, Hkv, D, V, theta, eps, scale, gates, dms_gates] = shape_;
  cudaStream_t st = d.stream;
  const bf16* w = d.weights;
  c::embedding_forward(d.x, d.in_dev.tokens, w + d.embed, n, C, 0, V, st);
  // From qkv_one_gemm_rows rows, a row's query, key and value as one GEMM over their adjacent
  // weights, its rows ld apart (bench/RESULTS.md entry 43: at 36 rows Q took 10.5 µs beside K and
  // V, 6.2 alone); below, three GEMMs into packed rows in the same buffer (ld 0 to the readers).
  const bool one_gemm = opt_.qkv_one_gemm_rows > 0 && n >= opt_.qkv_one_gemm_rows;
  const long ld = one_gemm ? static_cast<long>(H + 2 * Hkv) * D : 0;
  bf16* q = d.qkv;
  bf16* k = q + (one_gemm ? H * D : static_cast<long>(n) * H * D);
  bf16* v = k + (one_gemm ? Hkv * D : static_cast<long>(n) * Hkv * D);
  for (int l = 0; l < config_.num_hidden_layers; ++l) {
    EnqueueQkv(l, n, d.x, d.xn, d.rstd, q, k, v, ld);
    if (dmc_) c::dmc_gates_forward({nullptr, nullptr, d.merge, nullptr, d.omega}, q, k, nullptr,
                                   1, n, H, Hkv, D, gates, st, ld);
    const size_t g = size_t(rows_) * Hkv;
    if (dms_)
      EnqueueDmsDecisions(l, n, d.x, q, ld, d.xn, d.rstd, d.dms, d.dms + g, d.dms + 2 * g,
                          d.merge, nullptr);
    const c::PagedKv layer = CacheLayer(l);
    // KVSharer: a layer that reads an earlier one's cache writes nothing and attends to that
    // layer's slots (only the bf16 vanilla cache shares, ValidateKvSharing).
    const int source = KvSourceLayer(opt_.policy, l);
    const c::PagedKv read = source == l ? layer : CacheLayer(source);
    // The queries' rotation beside the cache's update, which reads neither q nor qr: a branch
    // of the step's graph, joined before the attention.
    ENGINE_CUDA(cudaEventRecord(d.fork, st));
    ENGINE_CUDA(cudaStreamWaitEvent(d.kv_streams[0], d.fork));
    c::rope_forward_positions(d.qr, q, 1, n, H, D, d.in_dev.positions, theta, keep_ctrl_,
                              d.kv_streams[0], ld);
    if (dms_qchannel_)
      model::cuda_model_detail::set_dms_query_channel(d.qr, nullptr, n, H, Hkv, D,
                                                      d.kv_streams[0]);
    ENGINE_CUDA(cudaEventRecord(d.joins[0], d.kv_streams[0]));
    // Settling: the heads whose token opens a slot while page_size slots of their residual
    // have settled close them into a page first, one quantizer (or ThinK pruning) launch for all
    // heads of the step. DMS's slots settle past its window, the page's rows staged as the
    // residual closes up. Per-token keys: the residual's slot settles into its page's next row.
    if (settles_) {
      const bool lagged = cache_opt_.settle_lag > 0;
      if (lagged)
        c::paged_kv_settle_lagged_step(d.close_ids, d.close_rows, d.close_k, d.close_v,
                                       SettleLayer(l), layer.k_pool, layer.v_pool,
                                       d.in_dev.positions, n, Hkv, D, st);
      else
        c::paged_kv_settle_step(d.close_ids, d.close_page_rows, d.close_rows, SettleLayer(l),
                                dmc_ ? d.merge : nullptr, d.in_dev.positions, n, Hkv, st);
      const bf16* k_rows = lagged ? d.close_k : layer.k_pool;
      const bf16* v_rows = lagged ? d.close_v : layer.v_pool;
      if (slots_settle_)
        c::kv_quantize_rows(d.q_pages, layout_, d.close_ids, d.close_page_rows, k_rows, v_rows,
                            d.close_rows, n * Hkv, st);
      else if (quant_)
        c::kv_quantize_pages(d.q_pages, layout_, d.close_ids, k_rows, v_rows, d.close_rows,
                             n * Hkv, st);
      else
        c::think_prune_pages(d.think_k, d.think_v, d.think_masks, ThinkEnergy(l), d.close_ids,
                             k_rows, v_rows, d.close_rows, n * Hkv, opt_.page_size, D,
                             cache_opt_.think_channels, st);
    }
    if (source == l)
      c::paged_kv_append(layer, k, v, dmc_ ? d.merge : nullptr, dmc_ ? d.omega : nullptr,
                         d.in_dev.positions, n, Hkv, D, theta, keep_ctrl_, st, ld);
    // DMS: the marked token that leaves now is gone before this step's attention.
    if (dms_)
      c::paged_kv_dms_evict(layer, Marks(l), d.merge, d.in_dev.positions, n, Hkv, D,
                            config_.dms.window, st);
    ENGINE_CUDA(cudaStreamWaitEvent(st, d.joins[0]));
    // ThinK: after the settle (a page closing now is scored by the queries before this one), as
    // PagedDecoder::Run observes each token's query after its cache update.
    if (think_) c::think_observe_queries(ThinkEnergy(l), d.qr, n, H, Hkv, D, keep_ctrl_, st);
    const int probs_stride = ProbsStride();
    if (think_) {
      const kernels::KvSettleLayer pruned = SettleLayer(l);
      c::paged_decode_attention_think(d.att, nullptr, probs_stride, d.qr, d.think_k, d.think_v,
                                      d.think_masks, cache_opt_.think_channels, pruned.page_table,
                                      pruned.q_lengths, max_pages_, opt_.page_size, layer.k_pool,
                                      layer.v_pool, d.r_blocks, layer.lengths, residual_slots_, n,
                                      H, Hkv, D, keep_ctrl_, scale, st, AttentionChunk(n));
    } else if (quant_) {
      const kernels::KvSettleLayer q = SettleLayer(l);
      c::paged_decode_attention_quantized(d.att, zip_ ? d.probs : nullptr, probs_stride, d.qr,
                                          d.q_pages, layout_, q.page_table, q.q_lengths,
                                          max_pages_, layer.k_pool, layer.v_pool, d.r_blocks,
                                          layer.lengths, residual_slots_, n, H, Hkv, D,
                                          keep_ctrl_, scale, st, AttentionChunk(n));
      // ZipCache: every residual slot's score adds the attention it just received.
      if (zip_) c::paged_kv_settle_scores(q, d.probs, probs_stride, n, H, Hkv, st);
    } else {
      c::paged_decode_attention(d.att, d.probs, probs_stride, d.qr, d.k_pool, d.v_pool,
                                read.page_table, read.lengths, max_pages_, opt_.page_size, n, H,
                                Hkv, D, keep_ctrl_, scale, st, AttentionChunk(n));
    }
    // H2O and TOVA evict by this attention, after it and before the next layer, as the CPU
    // decoder does; the host returns the pages that empty after the step.
    if (evicts_)
      c::paged_kv_evict(layer, d.scores, d.probs, probs_stride, d.in_dev.positions, n, H, Hkv, D,
                        EvictPolicyOf(opt_.policy, l), st);
    c::matmul_forward_add(d.x, d.att, w + d.W(l, kWo), n, H * D, C, st);
    EnqueueMlp(l, n, d.x, d.xn, d.rstd, d.gate_up, d.h);
  }
  c::rmsnorm_forward(d.xn, d.rstd, d.x, w + d.final_norm, n, C, eps, st);
  c::matmul_forward_f32(d.logits, d.xn, w + d.lm_head, n, C, V, st);
  c::sample_tokens(d.next, d.logprob, d.argmax, d.logits, n, V, RowsOf(d.in_dev), st);
}

absl::Status CudaEngine::Step(const std::vector<int>& seqs, const int32_t* tokens,
                              const int32_t* targets, std::vector<TokenOutput>* out) {
  if (absl::Status s = NoStepOut("a step"); !s.ok()) return s;
  if (absl::Status s = Launch(seqs, tokens, targets); !s.ok()) return s;
  return Collect(out);
}

absl::Status CudaEngine::CanLaunchAhead() const {
  if (dms_ || evicts_ || settles_ || loma_ || !opt_.policy.kv_source.empty())
    return absl::InvalidArgumentError(absl::StrFormat(
        "steps launched ahead run the vanilla and dmc caches at bf16, not %s",
        PolicyName(opt_.policy)));
  // A sequence's first page holds its second token too (the step launched ahead of its first).
  if (opt_.page_size < 2)
    return absl::InvalidArgumentError("steps launched ahead need pages of 2 slots or more");
  if (!seqs_.empty())
    return absl::FailedPreconditionError(
        "launch ahead is set before any sequence is admitted: its page hand-outs look two steps "
        "ahead from the first");
  return absl::OkStatus();
}

absl::Status CudaEngine::NoStepOut(const char* what) const {
  if (launched_.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrFormat("%s waits until the steps launched are collected", what));
}

absl::Status CudaEngine::Launch(const std::vector<int>& seqs, const int32_t* tokens,
                                const int32_t* targets) {
  const int n = static_cast<int>(seqs.size());
  if (n == 0) return absl::InvalidArgumentError("a step needs at least one sequence");
  const bool ahead = !launched_.empty();
  if (absl::Status s = CheckLaunch(seqs, tokens, ahead ? &launched_.back().seqs : nullptr);
      !s.ok())
    return s;
  // A choice still on the device is in the vocabulary.
  for (int i = 0; i < n; ++i)
    if (absl::Status s = Validate(seqs[i], tokens[i] < 0 ? 0 : tokens[i]); !s.ok()) return s;
  if (absl::Status s = CanStep(seqs); !s.ok()) return s;
  Device& d = *dev_;
  try {
    // While a step is out its rows stay (the same sequences), and its tail (page changes,
    // copies back) goes after this step's page hand-outs, so that the changes it finds count
    // them (EnqueueTail).
    if (!ahead) ArrangeRows(seqs);
    if (absl::Status s = GrowPages(seqs); !s.ok()) return s;
    if (ahead) EnqueueTail(launched_.back());
    const int b = next_buffer_;
    next_buffer_ ^= 1;
    StepIo& in = d.in_host[b];
    for (int i = 0; i < n; ++i) {
      Sequence& s = seqs_.at(seqs[i]);
      const int r = s.row;
      in.tokens[r] = tokens[i];
      in.positions[r] = s.tokens;
      in.targets[r] = targets ? targets[i] : -1;
      in.sample_pos[r] = s.tokens + 1;
      in.temperature[r] = s.sampling.temperature;
      in.top_p[r] = s.sampling.top_p;
      in.seed[r] = s.sampling.seed;
      ++s.tokens;
    }
    // Padding rows: token 0 at position 0, greedy, in heads emptied onto the sink page.
    const int rows = StepRows(n);
    for (int r = n; r < rows; ++r) {
      in.tokens[r] = 0;
      in.positions[r] = 0;
      in.targets[r] = -1;
      in.sample_pos[r] = 1;
      in.temperature[r] = 0.0f;
      in.top_p[r] = 1.0f;
      in.seed[r] = 0;
    }
    const cudaGraphExec_t graph = StepGraph(rows);  // a capture stays out of the device time
    ENGINE_CUDA(cudaEventRecord(d.step_begin[b], d.stream));
    ENGINE_CUDA(cudaMemcpyAsync(d.io_dev, d.io_host + b * d.io_bytes, d.io_bytes,
                                cudaMemcpyHostToDevice, d.stream));
    if (ahead) c::take_previous_choices(d.in_dev.tokens, d.next, n, d.stream);
    c::paged_kv_clear_rows(d.page_table, d.lengths, d.q_lengths, d.window_count, sink_page_,
                           config_.num_hidden_layers, rows_, config_.num_key_value_heads,
                           max_pages_, n, rows - n, d.stream);
    RunStep(rows, graph);
    ENGINE_CUDA(cudaEventRecord(d.step_end[b], d.stream));
    launched_.push_back({seqs, b, false});
  } catch (const std::runtime_error& err) {
    return absl::InternalError(err.what());
  }
  return absl::OkStatus();
}

void CudaEngine::EnqueueTail(Launched& step) {
  Device& d = *dev_;
  const int n = static_cast<int>(step.seqs.size());
  EnqueuePageChanges(0, n, PageLookahead());
  // Outputs of rows 0..n-1, their heads' lengths and the page changes.
  int32_t* host = d.out_host;
  ENGINE_CUDA(cudaMemcpyAsync(host, d.next, n * sizeof(int32_t), cudaMemcpyDeviceToHost, d.stream));
  ENGINE_CUDA(cudaMemcpyAsync(host + rows_, d.argmax, n * sizeof(int32_t), cudaMemcpyDeviceToHost, d.stream));
  ENGINE_CUDA(cudaMemcpyAsync(host + 2 * rows_, d.logprob, n * sizeof(float), cudaMemcpyDeviceToHost, d.stream));
  EnqueueCopyBack(0, n);
  ENGINE_CUDA(cudaEventRecord(d.collected[step.buffer], d.stream));
  step.tail = true;
}

absl::Status CudaEngine::Collect(std::vector<TokenOutput>* out) {
  if (launched_.empty()) return absl::FailedPreconditionError("no step is out to collect");
  Device& d = *dev_;
  Launched step = std::move(launched_.front());
  launched_.pop_front();
  const int n = static_cast<int>(step.seqs.size());
  try {
    if (!step.tail) EnqueueTail(step);
    ENGINE_CUDA(cudaEventSynchronize(d.collected[step.buffer]));
    AddStepGpuTime(step.buffer);
    const int32_t* host = d.out_host;
    out->resize(n);
    for (int i = 0; i < n; ++i) {
      const int r = seqs_.at(step.seqs[i]).row;
      float logprob;
      std::memcpy(&logprob, host + 2 * rows_ + r, sizeof(float));
      (*out)[i] = {host[r], logprob, host[rows_ + r]};
    }
    if (absl::Status st = ApplyPageChanges(0, n); !st.ok()) return st;
    if (loma_) return CompressSegments(step.seqs);
  } catch (const std::runtime_error& err) {
    return absl::InternalError(err.what());
  }
  return absl::OkStatus();
}

void CudaEngine::AddStepGpuTime(int buffer) {
  float gpu_ms = 0;
  ENGINE_CUDA(cudaEventElapsedTime(&gpu_ms, dev_->step_begin[buffer], dev_->step_end[buffer]));
  step_gpu_seconds_ += 1e-3 * gpu_ms;
}

int CudaEngine::PaddedRows(int n, int max_batch) {
  int rows = 1;
  while (rows < n && rows < kStepBucket) rows *= 2;
  if (rows < n) rows = (n + kStepBucket - 1) / kStepBucket * kStepBucket;
  return std::min(rows, max_batch);
}

int CudaEngine::StepRows(int n) const {
  if (!opt_.cuda_graphs || n < num_sequences()) return n;
  return PaddedRows(n, opt_.max_batch);
}

cudaGraphExec_t CudaEngine::StepGraph(int rows) {
  if (!opt_.cuda_graphs) return nullptr;
  Device::Graph& g = dev_->graphs[rows];
  // Captured at its second step (the kernels' scratch was sized for the most rows up front, so
  // no later call moves a buffer a graph points to).
  if (g.exec != nullptr || ++g.steps < 2) return g.exec;
  const auto start = std::chrono::steady_clock::now();
  cudaStream_t stream = dev_->stream;
  // Captured with nothing on the streams: a step launched ahead waits here, once per number of
  // rows, for the step out.
  ENGINE_CUDA(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  ENGINE_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  EnqueueStep(rows);
  ENGINE_CUDA(cudaStreamEndCapture(stream, &graph));
  ENGINE_CUDA(cudaGraphInstantiate(&g.exec, graph, 0));
  ENGINE_CUDA(cudaGraphDestroy(graph));
  graph_capture_seconds_ +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return g.exec;
}

int CudaEngine::graphs() const {
  int captured = 0;
  for (const auto& [rows, g] : dev_->graphs) captured += g.exec != nullptr;
  return captured;
}

void CudaEngine::RunStep(int rows, cudaGraphExec_t graph) {
  if (graph == nullptr) {
    EnqueueStep(rows);
    return;
  }
  const auto start = std::chrono::steady_clock::now();
  ENGINE_CUDA(cudaGraphLaunch(graph, dev_->stream));
  graph_launch_seconds_ +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ++graph_launches_;
}

absl::Status CudaEngine::CompressSegments(const std::vector<int>& seqs) {
  Device& d = *dev_;
  const kernels::LomaZones& z = config_.loma.zones;
  const int tc = z.segment(), Hkv = config_.num_key_value_heads, D = config_.head_dim();
  std::vector<int> full;
  for (int seq : seqs)
    if (seqs_.at(seq).tokens % tc == 0) full.push_back(seq);
  if (full.empty()) return absl::OkStatus();
  const int k = static_cast<int>(full.size());
  ArrangeRows(full);
  // Every head's t new slots at worst, as a prefill's tokens (CanStep counted them).
  EnqueuePageChanges(0, k, z.t);
  ENGINE_CUDA(cudaStreamSynchronize(d.stream));
  if (absl::Status s = ApplyPageChanges(0, k); !s.ok()) return s;
  if (absl::Status s = GrowPages(full); !s.ok()) return s;
  // <m> number m of every compressing row as one step of rows 0..k-1, each appending its KVs and
  // attending to every slot before it; the host writes the next pass's inputs once the stream
  // has read this one's. Rows k.. hold other sequences: no padding.
  const cudaGraphExec_t graph = StepGraph(k);
  ENGINE_CUDA(cudaEventRecord(d.step_begin[0], d.stream));
  for (int m = 0; m < z.t; ++m) {
    for (int seq : full) {
      const Sequence& s = seqs_.at(seq);
      const int chunk = s.tokens / tc - 1;  // the segment just completed
      d.in_host[0].tokens[s.row] = config_.loma.memory_token;
      d.in_host[0].positions[s.row] = kernels::loma_position(chunk * z.chunk() + tc + m, z);
      d.in_host[0].targets[s.row] = -1;
    }
    ENGINE_CUDA(cudaMemcpyAsync(d.io_dev, d.io_host, d.io_bytes, cudaMemcpyHostToDevice,
                                d.stream));
    RunStep(k, graph);
    ENGINE_CUDA(cudaStreamSynchronize(d.stream));
  }
  // [memory | segment of tc | t new memory] → [memory | t new memory] in every head.
  for (int l = 0; l < config_.num_hidden_layers; ++l)
    c::paged_kv_drop_span(CacheLayer(l), k, Hkv, D, tc, z.t, d.stream);
  ENGINE_CUDA(cudaEventRecord(d.step_end[0], d.stream));
  EnqueuePageChanges(0, k, 1);
  EnqueueCopyBack(0, k);
  ENGINE_CUDA(cudaStreamSynchronize(d.stream));
  AddStepGpuTime(0);
  return ApplyPageChanges(0, k);
}

void CudaEngine::EnqueuePrefill(int row, int P) {
  Device& d = *dev_;
  const auto& [C, H, Hkv, D, V, theta, eps, scale, gates, dms_gates] = shape_;
  cudaStream_t st = d.stream;
  const bf16* w = d.weights;
  const auto [logit, alpha, merge, mask, omega] = PromptGates(d.pgates, P, Hkv);
  c::embedding_forward(d.px, d.ptokens, w + d.embed, P, C, 0, V, st);
  for (int l = 0; l < config_.num_hidden_layers; ++l) {
    EnqueueQkv(l, P, d.px, d.pxn, d.prstd, d.pq, d.pk, d.pv);
    const bf16 *khat = d.pk, *vhat = d.pv;
    if (dmc_) {
      c::dmc_gates_forward({logit, alpha, merge, mask, omega}, d.pq, d.pk, nullptr, 1, P, H, Hkv, D,
                           gates, st);
      c::dmc_scan_forward_kv(d.pkhat, d.pvhat, logit /* denom over the logits: not read again */,
                             d.pk, d.pv, alpha, omega, 1, P, Hkv, D, config_.dmc.window, st);
      khat = d.pkhat;
      vhat = d.pvhat;
    }
    if (dms_)
      EnqueueDmsDecisions(l, P, d.px, d.pq, 0, d.pxn, d.prstd, d.pdms_x, logit, alpha, merge,
                          mask);
    c::rope_forward(d.pq, d.pq, 1, P, H, D, 0, theta, keep_ctrl_, st);
    c::rope_forward(d.pkr, khat, 1, P, Hkv, D, 0, theta, keep_ctrl_, st);
    if (dms_qchannel_)
      model::cuda_model_detail::set_dms_query_channel(d.pq, nullptr, P, H, Hkv, D, st);
    // DMC's mask on the diagonal; DMS's hard mask (−inf for a marked key) past the band of w + 1.
    c::dmc_attention_forward(d.patt, nullptr, d.pq, d.pkr, vhat, dmc_ || dms_ ? mask : nullptr, 1,
                             P, H, Hkv, D, keep_ctrl_, scale, st, dms_ ? config_.dms.window : 0);
    const c::PagedKv layer = CacheLayer(l);
    if (quant_) {
      // The prompt's slots into staging rows of pkr and pq (the attention has read them: free
      // now), slot s of head h at row h·max_context + s (DMS: its position and mark beside it);
      // then the settled ones into pages, the rest into the residual.
      c::PagedKv stage = layer;
      stage.k_pool = d.pkr;
      stage.v_pool = d.pq;
      stage.slot_pos = d.stage_pos;
      stage.page_table = d.stage_table;
      stage.page_size = max_context_;
      if (dms_)
        c::paged_kv_dms_prefill(stage, d.stage_marks, row, d.pk, d.pv, merge, P, Hkv, D,
                                config_.dms.window, theta, st);
      else
        c::paged_kv_prefill(stage, row, khat, vhat, d.pk, d.pv, dmc_ ? merge : nullptr,
                            dmc_ ? omega : nullptr, P, Hkv, D, theta, keep_ctrl_, st);
      const int ps = opt_.page_size;
      const int max_closed = kernels::KvSettlePrefillMaxClosed(P, ps, slots_settle_);
      c::paged_kv_settle_prefill(d.close_ids, d.close_page_rows, d.close_rows, max_closed,
                                 SettleLayer(l), layer.k_pool, layer.v_pool, d.pkr, d.pq,
                                 d.stage_pos, d.stage_marks, max_context_, row, P, Hkv, D, st);
      if (slots_settle_)
        c::kv_quantize_rows(d.q_pages, layout_, d.close_ids, d.close_page_rows, d.pkr, d.pq,
                            d.close_rows, Hkv * max_closed * ps, st);
      else
        c::kv_quantize_pages(d.q_pages, layout_, d.close_ids, d.pkr, d.pq, d.close_rows,
                             Hkv * max_closed, st);
    } else if (dms_) {
      c::paged_kv_dms_prefill(layer, d.marks, row, d.pk, d.pv, merge, P, Hkv, D,
                              config_.dms.window, theta, st);
    } else {
      c::paged_kv_prefill(layer, row, khat, vhat, d.pk, d.pv, dmc_ ? merge : nullptr,
                          dmc_ ? omega : nullptr, P, Hkv, D, theta, keep_ctrl_, st);
    }
    c::matmul_forward_add(d.px, d.patt, w + d.W(l, kWo), P, H * D, C, st);
    EnqueueMlp(l, P, d.px, d.pxn, d.prstd, d.pgate_up, d.ph);
  }
  EnqueueSample(row, P);
}

void CudaEngine::EnqueueChunk(int row, int start, int n) {
  Device& d = *dev_;
  const auto& [C, H, Hkv, D, V, theta, eps, scale, gates, dms_gates] = shape_;
  cudaStream_t st = d.stream;
  const bf16* w = d.weights;
  const auto [logit, alpha, merge, mask, omega] = PromptGates(d.pgates, n, Hkv);
  c::embedding_forward(d.px, d.ptokens, w + d.embed, n, C, 0, V, st);
  for (int l = 0; l < config_.num_hidden_layers; ++l) {
    EnqueueQkv(l, n, d.px, d.pxn, d.prstd, d.pq, d.pk, d.pv);
    // The chunk's hard decisions and, off the diagonal, its hard mask (kernels/dmc_gates.h).
    if (dmc_)
      c::dmc_gates_forward({logit, alpha, merge, mask, omega}, d.pq, d.pk, nullptr, 1, n, H, Hkv,
                           D, gates, st);
    // Into the cache as n steps would write it (in parallel over the chunk, from the row's
    // window state); k̂, v̂ of every token and the cached slots the chunk's queries see come back
    // (kernels/paged_kv_write.h).
    const c::PagedKv layer = CacheLayer(l);
    c::paged_kv_extend(layer, row, d.pk, d.pv, dmc_ ? merge : nullptr, dmc_ ? omega : nullptr,
                       start, n, Hkv, D, theta, keep_ctrl_, d.pkhat, d.pvhat, d.pprefix, st);
    c::rope_forward(d.pq, d.pq, 1, n, H, D, start, theta, keep_ctrl_, st);
    c::chunk_attention(d.patt, d.pq, d.k_pool, d.v_pool,
                       layer.page_table + static_cast<size_t>(row) * Hkv * max_pages_, max_pages_,
                       opt_.page_size, d.pprefix, d.pkhat, d.pvhat, dmc_ ? mask : nullptr, n, H,
                       Hkv, D, keep_ctrl_, scale, st);
    c::matmul_forward_add(d.px, d.patt, w + d.W(l, kWo), n, H * D, C, st);
    EnqueueMlp(l, n, d.px, d.pxn, d.prstd, d.pgate_up, d.ph);
  }
  EnqueueSample(row, n);
}

void CudaEngine::EnqueueSample(int row, int n) {
  Device& d = *dev_;
  const auto& [C, H, Hkv, D, V, theta, eps, scale, gates, dms_gates] = shape_;
  cudaStream_t st = d.stream;
  const bf16* w = d.weights;
  // The last position only: its logits and token choice in row `row` of the step buffers.
  const bf16* last = d.px + static_cast<size_t>(n - 1) * C;
  c::rmsnorm_forward(d.xn, d.rstd, last, w + d.final_norm, 1, C, eps, st);
  c::matmul_forward_f32(d.logits, d.xn, w + d.lm_head, 1, C, V, st);
  kernels::SampleRows rows = RowsOf(d.in_dev);
  rows.temperature += row;
  rows.top_p += row;
  rows.seed += row;
  rows.position += row;
  rows.target += row;
  c::sample_tokens(d.next, d.logprob, d.argmax, d.logits, 1, V, rows, st);
}

absl::Status CudaEngine::Prefill(int seq, const std::vector<int32_t>& prompt, int32_t target,
                                 TokenOutput* out) {
  if (absl::Status s = NoStepOut("a prefill"); !s.ok()) return s;
  if (!parallel_prefill())
    return absl::InvalidArgumentError(absl::StrFormat(
        "parallel prefill serves the dmc, dms and vanilla caches, not %s (it evicts or ranks "
        "slots by each step's attention, scores key channels by each step's query, compresses "
        "between steps, or its layers share caches: feed the prompt token by token)",
        PolicyName(opt_.policy)));
  const int P = static_cast<int>(prompt.size());
  auto it = seqs_.find(seq);
  if (it == seqs_.end())
    return absl::FailedPreconditionError(
        absl::StrFormat("prefill needs sequence %d admitted to the cache", seq));
  Sequence& s = it->second;
  const int start = s.tokens;
  if (start > 0 && !chunked_prefill())
    return absl::FailedPreconditionError(absl::StrFormat(
        "sequence %d holds %d tokens: the GPU engine's chunked prefill serves the dmc and vanilla "
        "caches at bf16, not dms (its eviction window across a chunk's start is not written on "
        "the GPU) or a quantized cache; prefill the whole prompt at once, or feed the rest token "
        "by token",
        seq, start));
  if (P < 1 || start + P > max_context_)
    return absl::InvalidArgumentError(absl::StrFormat(
        "a prompt (chunk) of %d tokens after %d: it must have 1 to %d tokens (the engine's "
        "context is %d)",
        P, start, max_context_ - start, max_context_));
  for (int32_t t : prompt)
    if (absl::Status st = Validate(seq, t); !st.ok()) return st;
  Device& d = *dev_;
  try {
    // Worst-case pages (every token its own slot): the growth for P tokens replaces the next
    // step's, which stays if they do not fit (the heads return nothing between steps).
    const int r = s.row;
    EnqueuePageChanges(r, 1, P);
    EnqueueCopyBack(r, 1);
    ENGINE_CUDA(cudaStreamSynchronize(d.stream));
    std::vector<std::pair<int32_t, int32_t>> next_step = s.growth;
    const long next_step_pages = s.growth_pages, next_step_spare = s.spare_pages;
    if (absl::Status st = ApplyPageChanges(r, 1); !st.ok()) return st;
    if (s.growth_pages > alloc_.free_pages()) {
      const long worst = s.growth_pages;
      s.growth = std::move(next_step);
      s.growth_pages = next_step_pages;
      s.spare_pages = next_step_spare;
      return absl::ResourceExhaustedError(absl::StrFormat(
          "a prompt (chunk) of %d tokens may need %d more KV pages; the budget has %d free", P,
          worst, alloc_.free_pages()));
    }
    if (absl::Status grown = GrowPages({seq}); !grown.ok()) return grown;
    ENGINE_CUDA(cudaMemcpyAsync(d.ptokens, prompt.data(), P * sizeof(int32_t),
                                cudaMemcpyHostToDevice, d.stream));
    d.in_host[0].targets[r] = target;
    d.in_host[0].sample_pos[r] = start + P;
    d.in_host[0].temperature[r] = s.sampling.temperature;
    d.in_host[0].top_p[r] = s.sampling.top_p;
    d.in_host[0].seed[r] = s.sampling.seed;
    ENGINE_CUDA(cudaMemcpyAsync(d.io_dev, d.io_host, d.io_bytes, cudaMemcpyHostToDevice, d.stream));
    if (start == 0)
      EnqueuePrefill(r, P);
    else
      EnqueueChunk(r, start, P);
    EnqueuePageChanges(r, 1, PageLookahead());
    int32_t* host = d.out_host;
    ENGINE_CUDA(cudaMemcpyAsync(host, d.next, sizeof(int32_t), cudaMemcpyDeviceToHost, d.stream));
    ENGINE_CUDA(cudaMemcpyAsync(host + 1, d.argmax, sizeof(int32_t), cudaMemcpyDeviceToHost, d.stream));
    ENGINE_CUDA(cudaMemcpyAsync(host + 2, d.logprob, sizeof(float), cudaMemcpyDeviceToHost, d.stream));
    EnqueueCopyBack(r, 1);
    ENGINE_CUDA(cudaStreamSynchronize(d.stream));
    float logprob;
    std::memcpy(&logprob, host + 2, sizeof(float));
    *out = {host[0], logprob, host[1]};
    s.tokens = start + P;
    return ApplyPageChanges(r, 1);
  } catch (const std::runtime_error& err) {
    return absl::InternalError(err.what());
  }
}

int CudaEngine::length(int seq, int layer, int h) const {
  const size_t at =
      (static_cast<size_t>(layer) * rows_ + seqs_.at(seq).row) * config_.num_key_value_heads + h;
  return dev_->lengths_host[at] + (settles_ ? dev_->q_lengths_host[at] : 0);
}

long CudaEngine::bytes(int seq) const {
  // The kept pages: those held, less the spares held (those not yet handed out are not held).
  const Sequence& s = seqs_.at(seq);
  return (s.num_pages - s.spare_pages + s.growth_pages) * alloc_.page_bytes() + ReservedBytes();
}

}  // namespace dmc::inference
