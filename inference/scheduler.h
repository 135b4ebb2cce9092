// Continuous batching over a decoding engine (inference/decode_engine.h, CPU or GPU): many
// requests decode together, one token each per step; a finished request frees its pages at once
// and a waiting one is admitted in its place, so a compressed cache (smaller per-sequence
// footprint) turns into more concurrent sequences.
//
// A request is a prompt and a total length. Its prompt goes in one parallel pass
// (DecodeEngine::Prefill) when the request asks for it and the engine's method has one, else
// token by token through the steps (evaluation scores every position that way). Each position
// fed gives one TokenOutput, scored against the prompt's next token while there is one; past
// the prompt the output's `next` token is appended, until the length or a stop.
//
// Admission: requests enter in order while fewer than max_batch run and, beside running ones,
// the free budget holds the request's prompt at worst, its first step at worst (a page per
// head) and each running sequence's expected growth over its next page_size tokens: a page per
// head scaled by the fraction of its tokens the sequence keeps (vanilla: a page per head, the
// worst case; a DMC sequence at CR 4: a quarter of that). Less would see a request preempted
// at once and its prefill redone, again and again, while the running ones stall; the worst
// case for every running sequence would hold a compressed cache to vanilla's concurrency.
// A prompt's worst case is a page per head for every page_size of its tokens, which an engine
// allocates before the pass that decides what its cache keeps. On an engine that continues
// sequences (DecodeEngine::chunked_prefill) a prompt need not be at worst all at once: one it
// refuses whole for memory goes in, in the same round, by pieces of prompt_piece_tokens, and
// prompts under a prefill budget (below) go in by chunks. Only a piece or chunk is at worst at a
// time, so a prompt counts as one at worst and the rest at the running sequences' kept fraction
// (KeptFraction), plus a part-filled page a head: a compressing model's queue does not wait for
// a whole uncompressed prompt's room. The same holds for the rest of a prompt under way. A
// prompt whose own cache keeps more than that and is refused for memory after its admission is
// queued again, to be admitted only at its whole worst case.
// Prefill budget: a prompt prefilled between two steps stalls every running sequence for its
// pass. With prefill_tokens_per_step > 0 and an engine that continues sequences
// (DecodeEngine::chunked_prefill), every step prefills at most that many prompt tokens in all:
// the prompts under way go on first, in admission order, then new ones start, each by a chunk
// of what the budget has left (chunked prefill), and a prompt joins the decoding sequences after
// its last chunk. Chunks change nothing a sequence computes (the engine's chunked prefill equals
// the whole prompt's). This bounds the per-token latency of the running sequences (the p99 of a
// server) at some cost in time to first token. On an engine without chunked prefill, while
// sequences run, the prompts prefilled between two steps add up to at most the budget (always at
// least one whole prompt, so a long one still enters). 0: no bound, whole prompts.
// Preemption: when the next step's worst-case growth does not fit the budget (or a prompt under
// way has no room for its next chunk), the most recently admitted request is freed and queued
// again at the front; it is recomputed from its tokens
// later (decoding is deterministic, and each position is reported only once, so callers never
// see the recomputation). A request that does not fit even alone is an error.
// The scheduler is step-driven (StepOnce), so a server can submit and cancel between steps;
// RunBatched runs a fixed set of requests to completion.
// Launch ahead (an engine with launch_ahead(), DecodeEngine::Launch): a round launches its step
// and returns; the next round launches the following step before it collects and delivers this
// one, whenever the batch goes on unchanged (every request continues past the step out, none is
// cancelled, the budget holds the growth), so the device runs a step while the host delivers
// the previous one and the callers do their work. A sequence's token past what the host knows
// is then the step out's choice, read on the device. A round that would change the batch
// (a prompt under way, a waiting request the budget holds, preemptions, releases) collects
// first and launches after, so the engine never holds two steps of different batches; requests
// that arrive while the batch runs join at the next round, not when some request ends. The
// outputs and the cache are those of the rounds without it, but for a request that ends by a
// stop (TokenFn false) or a cancellation while its next step is out: it rides that step, whose
// output is dropped, and its FinishFn sees the cache with that token in it.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <vector>

#include "absl/status/statusor.h"
#include "inference/decode_engine.h"

namespace dmc::inference {

struct Request {
  // The prompt (generated tokens are appended to it), or an evaluation window: tokens past
  // `length` are the targets of the last positions only.
  std::vector<int32_t> tokens;
  int length = 0;  // positions to feed in all (>= tokens.size() for a prefilled prompt)
  SamplingOptions sampling;
  bool prefill = false;         // the prompt in one pass when the engine has one
};

// The output of position pos of request r (the token at pos + 1 is being predicted). Returns
// false to end the request there.
using TokenFn = std::function<bool(int request, int pos, const TokenOutput& out)>;
// Called once per request, before its cache is freed (to read its per-head lengths);
// cancelled: it ended by Cancel.
using FinishFn = std::function<void(int request, bool cancelled)>;

struct SchedulerStats {
  long steps = 0;
  long tokens = 0;          // tokens fed, recomputation and prefill included
  long prefill_tokens = 0;  // of those, fed by parallel prefill
  long preemptions = 0;
  long pieced_prompts = 0;  // prompts (or chunks) refused whole at their worst case, fed by pieces
  long refused_prompts = 0;  // prompts refused for memory after their admission, queued again
  long steps_ahead = 0;     // steps launched before the previous one's delivery (launch ahead)
  double prefill_seconds = 0;  // spent in DecodeEngine::Prefill
  double step_seconds = 0;     // spent in the engine's Launch and Collect
  int max_concurrent = 0;   // most sequences in one step
  double seconds = 0;       // wall time of RunBatched
  // The steps taken while requests waited for admission: the batch as large as the cache budget
  // (or max_batch) allows, the engine's rate at saturation without the drain of the last ones.
  // Their seconds are the wall time of those scheduler rounds (the step, the deliveries, the
  // finished requests' release), less the prefills in them.
  long saturated_steps = 0, saturated_tokens = 0;
  double saturated_seconds = 0;
  double saturated_step_seconds = 0;  // of saturated_seconds, in Collect (waiting for the device)
  // Σ over those steps of the budget's share in pages (DecodeEngine::used_bytes) and of the
  // share the sequences keep (Σ bytes(seq)): their means say where a full cache's bytes go.
  double saturated_used_share = 0, saturated_kept_share = 0;
};

class Scheduler {
 public:
  // Prompt pieces (see Admission): on the GPU a prefill of 256 tokens still fills the tensor
  // cores, and at the 1B shape its worst case is ~2% of a 0.25 GiB budget. 0: no pieces (every
  // prompt at its whole worst case).
  static constexpr long kPromptPieceTokens = 256;

  Scheduler(DecodeEngine& engine, int max_batch, long prefill_tokens_per_step = 0,
            long prompt_piece_tokens = kPromptPieceTokens)
      : engine_(engine),
        max_batch_(max_batch),
        prefill_tokens_per_step_(prefill_tokens_per_step),
        prompt_piece_tokens_(prompt_piece_tokens > 0 ? prompt_piece_tokens
                                                     : std::numeric_limits<long>::max()) {}

  // Queues a request; returns its id (also its sequence id in the engine). InvalidArgument for an
  // empty prompt, a length below it or past max_position_embeddings, or a token outside the
  // vocabulary.
  absl::StatusOr<int> Submit(Request request);
  // Ends request id at the next StepOnce (its FinishFn gets cancelled = true); unknown ids and
  // finished requests are ignored.
  void Cancel(int id);
  // Admits, prefills and steps once; outputs and ends go to the callbacks.
  absl::Status StepOnce(const TokenFn& on_token, const FinishFn& on_finish);

  bool idle() const { return pending_.empty() && active_.empty() && prefilling_.empty(); }
  // Admitted requests: decoding, or with their prompts under way.
  int running() const { return static_cast<int>(active_.size() + prefilling_.size()); }
  int waiting() const { return static_cast<int>(pending_.size()); }
  const Request& request(int id) const { return requests_.at(id).request; }
  const SchedulerStats& stats() const { return stats_; }
  DecodeEngine& engine() { return engine_; }

 private:
  struct Entry {
    Request request;
    int reported = 0;  // positions whose output was given
    bool cancelled = false;
    bool ended = false;  // ended while its next step was out (launch ahead): it rides that step
    // Its prompt was refused for memory after its admission (the kept fraction underestimated
    // it): admitted again only at its whole worst case, so the refused work is not redone
    // round after round.
    bool refused = false;
  };
  // A step launched and not yet collected: its requests and the position each one fed.
  struct OutStep {
    std::vector<int> ids;
    std::vector<int> positions;
    bool saturated = false;  // requests were waiting when it was launched
  };
  // Reports the output of position pos of id and appends or stops; true while it goes on.
  bool Deliver(int id, int pos, const TokenOutput& out, const TokenFn& on_token);
  absl::Status Finish(int id, bool cancelled, const FinishFn& on_finish);
  // Prompts under way first (a chunk each), then new requests, within the prefill budget.
  absl::Status Admit(const TokenFn& on_token, const FinishFn& on_finish);
  // Prefills the next chunk of id's prompt, at most budget_left tokens; true when the prompt is
  // done and the request goes on decoding (false: more to prefill, or it ended there).
  absl::StatusOr<bool> PrefillChunk(int id, long budget_left, const TokenFn& on_token,
                                    const FinishFn& on_finish);
  // Prefills tokens [from, from + n) of id's prompt; when the engine refuses them at their worst
  // case (ResourceExhausted) and continues sequences, in pieces of prompt_piece_tokens. A piece
  // refused after others went in leaves the sequence partly fed: the status is returned and the
  // caller frees or preempts it.
  absl::Status PrefillTokens(int id, long from, long n, TokenOutput* out);
  // Launches the step of active_ (the tokens at each one's next position, the step out's choice
  // past the known ones).
  absl::Status LaunchStep();
  // Launch ahead: launches the next step while one is out, if the batch goes on unchanged;
  // whether it did.
  absl::StatusOr<bool> LaunchAhead();
  // Collects the oldest step out and delivers its outputs; ends the requests that stop there
  // (or marks them riding, when a step launched ahead holds them).
  absl::Status CollectStep(const TokenFn& on_token, const FinishFn& on_finish);
  // A round's wall time, less its prefills, into the saturated seconds when the step it
  // collected was saturated.
  absl::Status EndRound(std::chrono::steady_clock::time_point start, double prefill_before);
  // Frees id's cache and queues it again at the front, to be recomputed.
  absl::Status Preempt(int id);
  // The cache's heads, layers × KV heads: a page each per page_size slots.
  long CacheHeads() const;
  // A running sequence's expected new pages over its next page_size tokens (see Admission).
  long GrowthPages(int id) const;
  // Σ slots over Σ heads × tokens of the admitted requests: the fraction of its tokens a new
  // sequence is expected to keep (1 with none fed, and for vanilla).
  double KeptFraction() const;
  // The pages e's prompt (or its rest) of `tokens` needs while it goes in (see Admission): at
  // worst once refused.
  long PromptPages(const Entry& e, long tokens, double kept_fraction) const;
  // The admitted requests' reserve: GrowthPages of each, and for a prompt under way its rest's
  // PromptPages.
  long RunningGrowthPages(double kept_fraction) const;
  // Whether the free budget holds e's prompt (PromptPages), its first step and the running
  // reserve.
  bool Affordable(const Entry& e, long running_growth_pages, double kept_fraction) const;

  DecodeEngine& engine_;
  int max_batch_;
  long prefill_tokens_per_step_;
  long prompt_piece_tokens_;
  int next_id_ = 0;
  std::map<int, Entry> requests_;
  std::deque<int> pending_;
  std::vector<int> active_;
  std::vector<int> prefilling_;  // admitted, their prompts partly prefilled, in admission order
  long prefilled_this_step_ = 0;  // prompt tokens prefilled by the current Admit
  std::deque<OutStep> out_;       // launched, not collected: one, two while launching ahead
  bool collected_saturated_ = false;  // the step this round collected was saturated
  SchedulerStats stats_;
};

// Runs requests[r] (as ids 0, 1, ... in order) to completion on a fresh scheduler.
absl::StatusOr<SchedulerStats> RunBatched(DecodeEngine& engine, std::vector<Request>& requests,
                                          int max_batch, const TokenFn& on_token,
                                          const FinishFn& on_finish,
                                          long prefill_tokens_per_step = 0,
                                          long prompt_piece_tokens = Scheduler::kPromptPieceTokens);

}  // namespace dmc::inference
