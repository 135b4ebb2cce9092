// The OpenAI-style completion request of dmc-serve, apart from HTTP: parsing and checking the
// JSON body, and the text a generation turns into (incremental UTF-8-safe decoding, stop
// strings, EOS). Parsing is strict: a field of the wrong type, an unknown field or a value out
// of range is an InvalidArgument that names it. A known field's null is its default; OpenAI's
// fields for what is not served (penalties, best_of, logit_bias, echo, logprobs, suffix) are
// accepted at the value that changes nothing (0, 1, {}, false, null) and refused at any other.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "data/tokenizer.h"
#include "inference/decode_engine.h"

namespace dmc::inference {

struct CompletionRequest {
  std::vector<int32_t> prompt;     // token ids (a text prompt encoded by the server's tokenizer)
  int max_tokens = 16;             // tokens to generate at most
  SamplingOptions sampling;
  std::vector<std::string> stop;   // up to 4 strings; the text ends before the first one
  bool stream = false;
};

// What a request must fit: the model's embedding rows (prompt token ids below vocab_size, which
// may pad past the tokenizer's) and max_position_embeddings (prompt + max_tokens within context).
struct ModelLimits {
  int vocab_size = 0;
  int context = 0;
};

// body: the request's JSON; a text prompt is encoded by `tokenizer`.
absl::StatusOr<CompletionRequest> ParseCompletionRequest(const std::string& body,
                                                         const data::Tokenizer& tokenizer,
                                                         const ModelLimits& limits);

// The text of one generation as tokens arrive. Text is released only where it is final: not
// the trailing bytes of an incomplete UTF-8 character, nor a tail that could still begin a stop
// string. dmc-serve's engine thread adds the tokens, for every row of every step, and the thread
// that streams the request releases the text: without stop strings a token is decoded when its
// text is asked for (Release, text()), on that thread, so Add is a push; with stop strings, at
// Add, which must say whether the text stops there.
class CompletionText {
 public:
  CompletionText(const data::Tokenizer& tokenizer, std::vector<std::string> stop)
      : tokenizer_(tokenizer), stop_(std::move(stop)) {}
  // Adds a generated token; false when the generation ends there (EOS or a stop string).
  bool Add(int32_t token);
  // Text not released yet that is final; everything left when `finished`.
  std::string Release(bool finished);
  // The tokenizer's Decode of tokens(), cut at a stop string.
  const std::string& text();
  const std::vector<int32_t>& tokens() const { return tokens_; }
  bool stopped() const { return stopped_; }

 private:
  // Decodes the tokens added since the last call into text_; returns where text_ changed from.
  size_t CatchUp();
  // text_ = the tokenizer's Decode of the first n tokens, from that of the first n - 1; returns
  // where text_ changed from (its old size, or 0 when it was decoded whole again).
  size_t AppendDecoded(size_t n);

  const data::Tokenizer& tokenizer_;
  std::vector<std::string> stop_;
  std::vector<int32_t> tokens_;
  std::string text_;       // the first decoded_ tokens decoded, cut at a stop string
  size_t decoded_ = 0;
  size_t released_ = 0;
  bool stopped_ = false;
};

}  // namespace dmc::inference
