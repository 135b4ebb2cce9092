// The decoding engine on one GPU (inference/decode_engine.h), checked against the CPU engine
// (inference/cpu_engine.h, the specification) by tests/cuda/test_cuda_engine.cpp.
//
// What lives on the device: the model's weights in bf16 (no master copy, gradients or moments:
// a 7B model takes 13.5 GB), the paged cache (bf16 key and value pools carved from the byte
// budget, per-(layer, row, KV head) page tables and lengths, the DMC window state: raw keys and
// values in bf16 as the projections give them, importances in fp32) in the flat layout of
// kernels/paged_kv_write.h, and the activations of one step of up to max_batch sequences and of
// one prefill of up to max_context tokens.
//
// A decode step of n sequences (rows 0..n-1; a sequence keeps its row while it lives, and the
// last row moves into a freed one) is: every head whose last page is full holds a page more (the
// worst case of the step, as the CPU cache's CanStep counts; the host hands it out when the head
// fills its page, and the head keeps it until the head's next slot needs it), the step runs on the device
// (per layer RMSNorm, Q, K and V as one GEMM from qkv_one_gemm_rows rows, below as three with K
// and V beside Q, the hard DMC decisions, the append-or-merge write of all heads of all rows in one kernel, beside it on
// another stream RoPE of the queries at each row's position, the paged decode attention, the O GEMM with the residual in its epilogue, the MLP; then the LM head in fp32 and
// the token choice, kernels/sample.h) as one CUDA graph replay (below), then
// kernels/paged_kv_pages.h finds the heads whose pages change. Copies bring back the chosen tokens, every
// head's length (a host mirror that length() reads) and the few heads that return pages (an
// eviction emptied them, or a prefill's worst case left them unfilled) or need one before the
// next step; the host touches only those heads, not every head
// of every sequence (1,024 a sequence at Llama-2-7B's shape). Between steps a head holds
// ceil(slots / page_size) pages, as the CPU cache does, and the spare one if its last page is
// full; bytes() counts the kept pages only, KvSequenceBytes at the engine's widths,
// while used_bytes() (the allocator's) includes the spares.
//
// Step graphs, as vLLM's: a step replays the CUDA graph of its number of rows, captured at the
// second step of that number (the first runs the kernels directly: a number met once costs no
// capture). A step of every sequence held (its rows 0..n-1 are all the used rows) is padded
// (PaddedRows) to a multiple of kStepBucket rows, or to max_batch, so that a saturated batch,
// whose size moves by a few sequences as they finish and join, replays a few graphs instead of
// capturing one for each size; below kStepBucket, to the next power of two, so that a step of one
// or two sequences keeps its rows and its projections the few-rows matmul (kernels/matmul.cu),
// which reads the weights faster than cuBLAS at one or two rows and which a padded step would
// miss. The padding rows hold no sequence; before the step kernels::paged_kv_clear_rows
// empties their heads and points their page tables at a sink page, one past the budget's pages,
// which no sequence holds: their tokens (id 0 at position 0, greedy) append into the sink's
// slot 0 (settling: into their own residual blocks) and attend to it alone, touch no other row's
// pages and nothing the allocator counts, and the host ignores their outputs. A step of some of
// the sequences (LoMA's compressions, a step beside chunked prefills) runs at its own number of
// rows.
//
// Launch ahead (DecodeEngine::Launch, Collect; vanilla and dmc at bf16): step N + 1 goes on the
// stream while step N is out, the same rows, each row's token read on the device from step N's
// choice (kernels::take_previous_choices) where the host does not know it yet. The stream then
// holds N + 1's page hand-outs, N's tail (its page changes and the copies back, which Collect
// waits for), N + 1's input upload and graph. N's page changes are therefore applied on the host
// after N + 1 is launched: they look two tokens ahead (PageLookahead), so that the pages handed
// out before step N cover N + 1 too (a head's worst case grows a slot a step), and since they
// are found after N + 1's hand-outs they count those and hand out nothing twice. Two input
// buffers alternate between launches (a launch ahead fills one while the other's upload may
// still wait on the stream); the outputs' host buffers are read by Collect before the next tail
// is enqueued. Admissions, releases and prefills wait until nothing is out (FailedPrecondition),
// so rows move only then. A capture waits for the step out (StepGraph).
//
// Prefill runs the prompt through the parallel forward with hard decisions (the training-mode
// graph on the fused DMC attention kernel, one layer's activations at a time, so a prompt of
// max_context tokens needs no chunking) and writes its compressed cache directly
// (kernels::paged_kv_prefill). Chunked prefill (dmc, vanilla; a sequence that holds tokens):
// per layer the chunk's Q/K/V GEMMs and hard decisions, kernels::paged_kv_extend writing its
// tokens' slots as the steps would, in parallel over the chunk (a scan from the sequence's
// length and DMC window state; it gives every token's k̂, v̂ as stored and the cached slots the
// chunk sees: less DMC's open slot for a head whose first chunk token merges into it), then
// kernels::chunk_attention: the queries over those cached slots and over the chunk under the
// hard mask, one tensor-core pass. DMS refuses a chunk after the first: its eviction window
// across the chunk's start is not written on the GPU.
//
// H2O and TOVA: the step appends every token (the vanilla write), the attention also writes its
// weights, and kernels::paged_kv_evict drops the slots the policy rejects in every head of every
// row, layer by layer, as the CPU decoder's H2OUpdate and TovaUpdate do (H2O's accumulated scores
// and every slot's position live beside the pools on the device, so the step stays one graph).
// The host then returns the pages that emptied (kernels/paged_kv_pages.h), as the CPU cache does at each
// eviction, so bytes() and used_bytes() equal the CPU engine's at bf16 pages. Their prompts
// go token by token through Step, as on the CPU engine (parallel_prefill() is false, Prefill
// refuses): eviction follows each step's attention, and H2O's scores sum the attention of every
// query, which the parallel forward does not produce; so the cache holds what the CPU engine's
// does, exactly the same slots when the weights rank them the same. Per-layer budgets
// (PyramidInfer, ZigZagKV; inference/layer_budgets.h): each layer's eviction launch gets that
// layer's budget and recent window (LayerBudget, LayerRecent), and since pages are handed out and
// returned per head by its length, each layer holds the pages of its own budget.
//
// KVSharer (policy.kv_source, the bf16 vanilla cache): a layer that reads an earlier layer's
// cache appends nothing and its attention reads that layer's page tables and lengths; its heads
// are never handed a page, so they hold no slot and bytes() is KvSequenceBytes with 0 slots for
// them, as on the CPU engine. Its prompts go token by token (no parallel prefill, as on the CPU
// engine: the parallel forward does not read another layer's cache).
//
// DMS (a DMS model, the dms method; model/DMS.md §5): every layer of the step computes each row's
// hard
// eviction decisions on the device (the adapter, Linear(RMSNorm(residual)), or the query channel,
// which is then zeroed in q before and after RoPE, as Llama::DmsDecisionInput; then
// kernels/dms_gates.h), appends every token (the vanilla write) and runs
// kernels::paged_kv_dms_evict before the attention: token t's decision marks token t−1, and a
// marked token leaves its head w + 1 steps later, its last slot moving into the hole, as the CPU
// cache's DmsUpdate does. Each slot's mark lives beside its position in [pages, page_size], so the
// step stays one graph; the host returns the pages that emptied. The prompt goes
// through the parallel forward with the hard training mask (the fused attention's band of w + 1
// keys; the CPU engine's prefill is the same forward, and it equals token-by-token decoding) and
// kernels::paged_kv_dms_prefill writes the tokens that are still held, with their marks, so
// lengths, held tokens and bytes() equal the CPU engine's.
//
// KV quantization (policy.quant: int8, int4 or int2 of the vanilla, dmc and dms caches; KIVI's
// granularity, kernels/kv_quant.h; ZipCache's mixed precision on the vanilla cache): the cache of
// inference/paged_kv_cache.h's settling, on the device. Every head keeps its newest slots at bf16 in a residual block of page_size rows of its
// own (DMC's open slot among them, its window state beside) and the older ones in quantized
// pages of the budget's pool; there is no bf16 pool. Each layer of a step runs
// kernels::paged_kv_settle_step (the heads whose token opens a slot while their residual is full
// close it into a page, the page the host handed out as the worst case) and one
// cuda::kv_quantize_pages launch over all heads of the step (the heads that close nothing skip),
// then the append into the residual and the attention over the pages, dequantized as they are
// read, and the residual (cuda::paged_decode_attention_quantized): still one graph, no host
// sync. The prefill writes the prompt's slots into staging rows (the prefill's rotated keys and
// queries, free once its attention has read them), closes all but the last 1..page_size of them
// into pages in one launch per layer (kernels::paged_kv_settle_prefill, kv_quantize_pages) and
// copies the rest into the residual, so it leaves what feeding the prompt token by token leaves.
// bytes() counts the pages held and the reservations, as the CPU cache does, at quantized pages,
// bf16 residual blocks and window state: KvSequenceBytes for vanilla, dmc and ZipCache.
// DMS's quantized cache settles a slot only once past the eviction window (settle lag w + 1):
// its residual block holds page_size + w + 1 rows, each with its position and mark beside it,
// and evictions reorder it; kernels::paged_kv_settle_lagged_step closes the page_size oldest
// settled slots into a page (copied to a staging block for the quantizer) and moves the rest up
// in order, as PagedKvCache::Settle does, before the append and the eviction. Its prefill writes
// the prompt's held tokens into the staging rows with their positions and marks
// (paged_kv_dms_prefill) and closes the settled ones. Its bytes() is the CPU cache's (fewer
// pages than KvSequenceBytes's bound while the window holds settled-later slots). ZipCache
// (quant.salient_slots > 0, vanilla) ranks a page's slots by their normalized accumulated
// attention: the step's quantized attention also writes its weights, and
// kernels::paged_kv_settle_scores adds them to the residual slots' scores [L, R, Hkv,
// residual_slots], which paged_kv_settle_step reads to order a closing page's rows (the salient
// ones first, into the high-precision tier). Like the CPU engine, ZipCache has no parallel
// prefill (its scores need every query's attention): prompts go token by token.
//
// ThinK (policy.think_channels: the vanilla, dmc and dms caches; kernels/think_channels.h): the
// same settling with bf16 residual blocks, whose closing pages keep think_channels key channels.
// Every layer of a step adds its rows' rotated queries' energy per channel to their KV heads'
// [L, R, Hkv, D] fp32 (cuda::think_observe_queries, after the settle, as the CPU decoder observes
// a token's query after its cache update), and the settle's launch over all heads of the step is
// cuda::think_prune_pages: a closing page's channels are chosen by its keys and its head's
// energy, its keys pruned to them, its values kept whole, and the energy reset. The attention
// (cuda::paged_decode_attention_think) reads the pruned keys with zeros at the pruned channels.
// As on the CPU engine the prompt goes token by token (the channels are scored by each step's
// query); bytes() counts pages and reservations (query energy included) as the CPU cache does.
//
// LoMA (the loma method, a LoMA model; inference/paged_decoder.h): the step appends every token
// (the vanilla write); for the rows whose token completed a segment (every t·c tokens) the host
// then hands every head its t new slots' pages (as a prefill's), runs the t <m> tokens as t steps
// of those rows (the step's graph) at their layout positions, each appending its KVs and
// attending to every slot before it, and kernels::paged_kv_drop_span moves the t new slots over
// the segment in every head; the pages that emptied go back, so bytes() is the CPU engine's at
// bf16 pages. CanStep counts the t slots of a compression beside the step's. Prompts go token by
// token, as on the CPU engine. Steps rather than one chunk (EnqueueChunk): the <m> positions are
// c apart, not consecutive as paged_kv_extend rotates a chunk's keys, and the step's graph is
// already the CPU decoder's arithmetic (it too runs the <m> tokens as waves of a step); the cost
// is t steps of the compressing rows every t·c tokens, one host synchronisation each.
//
// Methods: dmc (a DMC model), dms (a DMS model, which decodes with nothing else, as on the CPU
// engine), loma (a LoMA model), vanilla (any other model; on a DMC model the control channel
// stays out of q·k as in training), h2o and tova (likewise, uniform or per-layer budgets);
// vanilla, dmc and dms also quantized or with ThinK's pruned keys, vanilla also with ZipCache's
// mixed precision or KVSharer's shared layers.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "inference/decode_engine.h"
#include "inference/page_allocator.h"
#include "kernels/cuda_ops.h"
#include "model/llama.h"

namespace dmc::inference {

struct CudaEngineOptions {
  CachePolicy policy;
  long budget_bytes = 1L << 30;  // pages and window state
  int page_size = 16;
  int max_batch = 64;    // sequences admitted at once, at most
  int max_context = 0;   // the longest sequence (prompt + generated); 0: max_position_embeddings
  bool cuda_graphs = true;  // steps as CUDA graphs, padded to buckets of rows (above)
  // The paged attention's flash-decoding chunk, in slots: each head's slots split into chunks of
  // this many, a CTA each, merged by a second kernel (a head of one chunk skips it). Longer
  // chunks leave a compressed cache's short heads one CTA and no merge; shorter ones spread a
  // few long heads over more of the GPU. 0: chosen per step by its (row, KV head) pairs against
  // the GPU's SMs (AttentionChunk: 128 below one per SM, 256 below four, else 512; measured on
  // an H100 at 1 to 323 rows, bench/RESULTS.md entries 33-34).
  int attention_chunk = 0;
  // A step of at least this many rows projects Q, K and V as one GEMM over their adjacent
  // weights; fewer rows, as three GEMMs with K and V beside Q. 0: always three.
  // kQkvOneGemmByMethod: from 24 rows for the learned methods (DMC, DMS), always three for the
  // others. Measured on an H100 (bench/RESULTS.md entries 46-47, 1B): one GEMM gave the DMC step
  // +4.8% tokens/s at CR 4 (42.6 rows) and +6.1% at CR 8 (75.2), DMS's +3.8% at CR 4 (45.3), and
  // cost vanilla 6.1%, 4.8% and 1.9% at 16, 24 and 47.9 rows.
  static constexpr int kQkvOneGemmByMethod = -1;
  static constexpr int kQkvOneGemmLearnedRows = 24;  // kQkvOneGemmByMethod's threshold for them
  int qkv_one_gemm_rows = kQkvOneGemmByMethod;
};

class CudaEngine : public DecodeEngine {
 public:
  // A step of every sequence runs a multiple of this many rows, or max_batch (with CUDA graphs;
  // above); below it, a power of two.
  static constexpr int kStepBucket = 8;
  // The rows a step of all n sequences held runs with graphs on: the next power of two below
  // kStepBucket, else the next multiple of kStepBucket, at most max_batch.
  static int PaddedRows(int n, int max_batch);
  // Widths of what a sequence holds (DecodeEngine::element_bytes, state_element_bytes): bf16
  // pages, residual blocks and DMC's windowed keys and values; DMC's importances and ThinK's query
  // energy in fp32. Static, so that a plan made before the engine exists (dmc-eval
  // --kv_fraction) counts the same bytes.
  static constexpr int kElementBytes = 2;
  static constexpr int kStateElementBytes = sizeof(float);

  // Uploads the weights of `model` (tensor-parallel size 1) in bf16; the model may be freed after.
  static absl::StatusOr<std::unique_ptr<CudaEngine>> Create(const model::Llama<float>& model,
                                                            const CudaEngineOptions& options);
  ~CudaEngine() override;
  CudaEngine(const CudaEngine&) = delete;
  CudaEngine& operator=(const CudaEngine&) = delete;

  const model::LlamaConfig& config() const override { return config_; }
  const CachePolicy& policy() const override { return opt_.policy; }
  const PagedCacheOptions& cache_options() const override { return cache_opt_; }
  int element_bytes() const override { return kElementBytes; }
  int state_element_bytes() const override { return kStateElementBytes; }
  absl::Status AddSequence(int seq, const SamplingOptions& sampling) override;
  absl::Status Free(int seq) override;
  bool contains(int seq) const override { return seqs_.count(seq) > 0; }
  int num_sequences() const override { return static_cast<int>(seqs_.size()); }
  int tokens(int seq) const override { return seqs_.at(seq).tokens; }
  absl::Status CanStep(const std::vector<int>& seqs) const override;
  // Not for h2o, tova and ZipCache: they rank slots by every step's attention; nor ThinK, which
  // scores channels by every step's query; nor loma, which compresses between steps; nor
  // KVSharer, whose layers read other layers' caches, which the parallel forward does not (as on
  // the CPU).
  bool parallel_prefill() const override {
    return !evicts_ && !zip_ && !think_ && !loma_ && opt_.policy.kv_source.empty();
  }
  // dmc and vanilla: a chunk continues a sequence (EnqueueChunk); dms refuses by name.
  bool chunked_prefill() const override { return parallel_prefill() && !dms_ && !quant_; }
  absl::Status Prefill(int seq, const std::vector<int32_t>& prompt, int32_t target,
                       TokenOutput* out) override;
  absl::Status Step(const std::vector<int>& seqs, const int32_t* tokens, const int32_t* targets,
                    std::vector<TokenOutput>* out) override;
  // Launch ahead (above): vanilla and dmc at bf16, set before the first admission.
  absl::Status Launch(const std::vector<int>& seqs, const int32_t* tokens,
                      const int32_t* targets) override;
  absl::Status Collect(std::vector<TokenOutput>* out) override;
  int steps_out() const override { return static_cast<int>(launched_.size()); }
  absl::Status CanLaunchAhead() const override;
  int length(int seq, int layer, int h) const override;
  long slots(int seq) const override { return seqs_.at(seq).slots; }
  long bytes(int seq) const override;
  long used_bytes() const override { return alloc_.used_bytes(); }
  long peak_bytes() const override { return alloc_.peak_bytes(); }

  int max_context() const { return max_context_; }
  int max_batch() const { return opt_.max_batch; }
  // Device time of every step so far, from its inputs' upload to its last kernel (graph captures
  // and the page changes after it left out); the rest of the wall time in Step is the host's
  // (page bookkeeping, copies back).
  double step_gpu_seconds() const { return step_gpu_seconds_; }
  // Host time spent capturing and instantiating step graphs (one per number of rows run, padded
  // to buckets, at its second step), and how many there are.
  double graph_capture_seconds() const { return graph_capture_seconds_; }
  int graphs() const;
  // Host time in cudaGraphLaunch over the steps that replayed a graph, and how many did: the
  // GPU, which has run the step's input upload by then, waits for it.
  double graph_launch_seconds() const { return graph_launch_seconds_; }
  long graph_launches() const { return graph_launches_; }

 private:
  struct Device;  // device buffers, streams, graphs (inference/cuda_engine.cpp)
  struct Sequence {
    int row = 0;
    int tokens = 0;
    SamplingOptions sampling;
    std::vector<std::vector<int32_t>> pages;  // [layer · Hkv + h], in page-table order
    long num_pages = 0;                       // Σ pages
    long slots = 0;                           // Σ every head's slots
    // Σ pages beyond the kept ones that the worst case of the next step needs (held once the
    // growth lists are handed out; kernels/paged_kv_pages.h).
    long spare_pages = 0;
    // The pages the next step may need (head layer · Hkv + h, count), ordered by head.
    std::vector<std::pair<int32_t, int32_t>> growth;
    long growth_pages = 0;
  };
  // A step launched and not collected: its sequences (in rows 0, 1, ...), the input buffer and
  // events it uses, and whether its tail (EnqueueTail) is on the stream.
  struct Launched {
    std::vector<int> seqs;
    int buffer = 0;
    bool tail = false;
  };
  CudaEngine(const model::LlamaConfig& config, const CudaEngineOptions& options);
  void Upload(const model::Llama<float>& model);
  // FailedPrecondition naming `what` while a step is out (launch ahead).
  absl::Status NoStepOut(const char* what) const;
  // A launched step's tail: its page changes, looking PageLookahead() tokens ahead, and the
  // copies of its outputs, lengths and changes to the host, then its collected event. Enqueued
  // by the next Launch (after that step's page hand-outs) or else by Collect.
  void EnqueueTail(Launched& step);
  // The tokens the page changes provide for: 1, the next step's; 2 with launch ahead, where the
  // step after it is launched before these changes reach the host.
  int PageLookahead() const { return launch_ahead() ? 2 : 1; }
  absl::Status Validate(int seq, int32_t token) const;
  // Makes the sequences of `seqs` occupy rows 0..n-1 (moving others out of the way).
  void ArrangeRows(const std::vector<int>& seqs);
  void MoveRow(int from, int to);
  // Hands the heads of `seqs` the pages of their growth lists; device tables updated.
  absl::Status GrowPages(const std::vector<int>& seqs);
  // LoMA: the pages the t memory slots of a compression add to seq's next step (0 unless its
  // next token completes a segment).
  long LomaCompressionPages(int seq) const;
  // LoMA, after a step of `seqs`: those whose token completed a segment compress it (above).
  absl::Status CompressSegments(const std::vector<int>& seqs);
  // Enqueues kernels::paged_kv_page_changes for rows row0 .. row0 + n − 1 before `tokens` more
  // tokens.
  void EnqueuePageChanges(int row0, int n, int tokens);
  // Copies those rows' lengths into the host mirror.
  void EnqueueCopyBack(int row0, int n);
  // After the stream's synchronisation: the pages those rows' heads return go back to the
  // allocator, their growth lists and slot counts are replaced.
  absl::Status ApplyPageChanges(int row0, int n);
  // What a sequence reserves at admission beside its pages: window state, residual blocks,
  // ThinK's query energy.
  long ReservedBytes() const { return KvReservedBytes(cache_opt_, element_bytes(), state_element_bytes()); }
  // Layer l of the device cache in the form of kernels/paged_kv_write.h (settling: the residual
  // blocks, each one page of residual_slots rows, where the appends go).
  kernels::PagedKvLayer<__nv_bfloat16> CacheLayer(int l) const;
  // Settling: layer l's compressed pages, lengths and residual slot state
  // (kernels/paged_kv_settle.h).
  kernels::KvSettleLayer SettleLayer(int l) const;
  // DMS: layer l's marks (kernels/paged_kv_dms_evict.h; settling: beside the residual rows).
  uint8_t* Marks(int l) const;
  // ThinK: layer l's query energy [R, Hkv, D].
  float* ThinkEnergy(int l) const;
  // The stride of a step's attention weights per query head: a head's pages, then (settling)
  // its residual block.
  int ProbsStride() const { return max_pages_ * opt_.page_size + (settles_ ? residual_slots_ : 0); }
  // The attention's chunk for a step of `rows` rows (CudaEngineOptions::attention_chunk).
  int AttentionChunk(int rows) const;
  // Layer l's attention norm of `rows` rows of x into xn (and rstd), then its Q, K, V projections.
  // qkv_ld 0: three GEMMs into packed q, k, v, K and V beside Q (a prompt's pass, and a step of
  // fewer than CudaEngineOptions::qkv_one_gemm_rows rows). qkv_ld > 0: one GEMM over the
  // adjacent weights, each row's query, key and value side by side from q, rows qkv_ld apart.
  void EnqueueQkv(int l, int rows, const __nv_bfloat16* x, __nv_bfloat16* xn, float* rstd,
                  __nv_bfloat16* q, __nv_bfloat16* k, __nv_bfloat16* v, long qkv_ld = 0);
  // The MLP block of layer l over `rows` rows of x (in place, the residual in the epilogue).
  void EnqueueMlp(int l, int rows, __nv_bfloat16* x, __nv_bfloat16* xn, float* rstd,
                  __nv_bfloat16* gate_up, __nv_bfloat16* h);
  // DMS: the hard eviction decisions evict [rows, Hkv] of layer l for rows of residual input x
  // and queries q, rows q_ld elements apart (0: packed; the query channel is read, then zeroed),
  // through input, logit and alpha [rows, Hkv]; the adapter's norm goes to xn and rstd, which are
  // free between the Q/K/V GEMMs and the MLP. mask (null in a step): the prefill's hard attention
  // mask, rows one sequence.
  void EnqueueDmsDecisions(int l, int rows, const __nv_bfloat16* x, __nv_bfloat16* q, long q_ld,
                           __nv_bfloat16* xn, float* rstd, float* input, float* logit,
                           float* alpha, float* evict, float* mask);
  // Enqueues the device work of a step of rows 0..n-1 (graph body; the page changes follow it
  // outside the graph, so that LoMA's <m> passes, which are steps too, leave the pages alone).
  void EnqueueStep(int n);
  // The rows a step of n sequences runs: PaddedRows when graphs are on and the step holds every
  // sequence (the rows after n are then free), else n.
  int StepRows(int n) const;
  // The step graph of `rows` rows: null at its first use (run the kernels directly), captured at
  // the second (the capture's time goes to graph_capture_seconds, not to the step's).
  cudaGraphExec_t StepGraph(int rows);
  // Runs a step of `rows` rows: the graph when there is one, else the kernels directly.
  void RunStep(int rows, cudaGraphExec_t graph);
  // Adds the device time between input buffer `buffer`'s step_begin and step_end events
  // (synchronised).
  void AddStepGpuTime(int buffer);
  void EnqueuePrefill(int row, int P);
  // A chunk of n tokens (in ptokens) continuing row `row` at position start (chunked prefill).
  void EnqueueChunk(int row, int start, int n);
  // The logits and token choice of the last of the n prefill rows, into row `row`'s outputs.
  void EnqueueSample(int row, int n);

  // What every enqueued op reads of the config (sizes, RoPE, RMSNorm, the hard decisions).
  struct Shape {
    int C, H, Hkv, D, V;
    float theta, eps, scale;
    kernels::DmcGateParams gates;
    kernels::DmsGateParams dms_gates;
  };

  model::LlamaConfig config_;
  Shape shape_{};
  CudaEngineOptions opt_;
  PagedCacheOptions cache_opt_;
  PageAllocator alloc_;
  int max_context_ = 0, max_pages_ = 0, rows_ = 0;
  int32_t sink_page_ = 0;  // the padding rows' page, one past the budget's (StepRows)
  double step_gpu_seconds_ = 0, graph_capture_seconds_ = 0, graph_launch_seconds_ = 0;
  long graph_launches_ = 0;
  bool dmc_ = false;          // decisions from the control channel (method dmc on a DMC model)
  bool evicts_ = false;       // h2o or tova: eviction by each step's attention
  bool dms_ = false;          // dms on a DMS model: eviction by the model's own decisions
  bool dms_qchannel_ = false; // its decision input is the query channel (else the adapter)
  bool keep_ctrl_ = false;    // channel D-1 is a control channel (a DMC model)
  bool quant_ = false;        // quantized pages (policy.quant.bits > 0)
  bool zip_ = false;          // ZipCache's salient slots (policy.quant.salient_slots > 0)
  bool think_ = false;        // ThinK's pruned pages (policy.think_channels > 0)
  bool settles_ = false;      // quantized or ThinK: a bf16 residual closing into pages
  bool slots_settle_ = false; // per-token keys: each slot quantized into its page's next row
  bool loma_ = false;         // loma on a LoMA model: every t·c tokens the segment compresses
  kernels::KvQuantPageLayout layout_{};  // of a quantized page
  int residual_slots_ = 0;    // rows of a settling head's residual block
  std::map<int, Sequence> seqs_;
  std::deque<Launched> launched_;  // oldest first, two at most
  int next_buffer_ = 0;            // the input buffer of the next launch
  std::vector<int> row_seq_;  // row → sequence id, -1 free
  std::unique_ptr<Device> dev_;
};

}  // namespace dmc::inference
