#include "inference/completion.h"

#include <algorithm>
#include <iterator>
#include <limits>

#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace dmc::inference {
namespace {

using nlohmann::json;

absl::Status Bad(const std::string& message) { return absl::InvalidArgumentError(message); }

// The fields the request itself uses; a null one is its default, as OpenAI takes it (some
// clients send every field).
constexpr const char* kFields[] = {"max_tokens", "temperature", "top_p", "seed", "stop",
                                   "stream",     "model",       "user",  "n"};

// OpenAI's other completion fields, for what is not served, which clients send explicitly at
// their defaults (LangChain's OpenAI sends both penalties 0, best_of 1 and logit_bias {}):
// accepted null or at the value that changes nothing, refused at any other, naming the feature.
struct NeutralField {
  const char* name;
  bool (*neutral)(const json& v);
  const char* only;  // the value accepted besides null, as the refusal says it
};
constexpr NeutralField kNeutralFields[] = {
    {"frequency_penalty", [](const json& v) { return v.is_number() && v.get<double>() == 0; },
     "0 (no penalty)"},
    {"presence_penalty", [](const json& v) { return v.is_number() && v.get<double>() == 0; },
     "0 (no penalty)"},
    {"best_of", [](const json& v) { return v.is_number_integer() && v.get<int64_t>() == 1; },
     "1"},
    {"logit_bias", [](const json& v) { return v.is_object() && v.empty(); }, "{}"},
    {"echo", [](const json& v) { return v.is_boolean() && !v.get<bool>(); }, "false"},
    {"logprobs", [](const json&) { return false; }, "null"},
    {"suffix", [](const json&) { return false; }, "null"},
};

const NeutralField* FindNeutralField(const std::string& key) {
  for (const NeutralField& f : kNeutralFields)
    if (key == f.name) return &f;
  return nullptr;
}

bool IsOptionalField(const std::string& key) {
  return FindNeutralField(key) ||
         std::any_of(std::begin(kFields), std::end(kFields),
                     [&](const char* name) { return key == name; });
}

// Bytes at the end of s that begin a UTF-8 character not complete yet.
size_t IncompleteUtf8Tail(const std::string& s) {
  for (size_t back = 1; back <= std::min<size_t>(3, s.size()); ++back) {
    const unsigned char c = static_cast<unsigned char>(s[s.size() - back]);
    if ((c & 0xC0) == 0x80) continue;  // a continuation byte: look further back
    const size_t need = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
    return need > back ? back : 0;
  }
  return 0;
}

}  // namespace

absl::StatusOr<CompletionRequest> ParseCompletionRequest(const std::string& body,
                                                         const data::Tokenizer& tokenizer,
                                                         const ModelLimits& limits) {
  const json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad("the body is not valid JSON");
  if (!j.is_object()) return Bad("the body must be a JSON object");
  CompletionRequest r;
  bool has_prompt = false;
  for (const auto& [key, v] : j.items()) {
    if (v.is_null() && IsOptionalField(key)) continue;  // its default
    if (key == "prompt") {
      has_prompt = true;
      if (v.is_string()) {
        r.prompt = tokenizer.Encode(v.get<std::string>());
      } else if (v.is_array()) {
        for (const json& t : v) {
          if (!t.is_number_integer())
            return Bad("\"prompt\" must be a string or an array of token ids (integers)");
          const int64_t id = t.get<int64_t>();
          if (id < 0 || id >= limits.vocab_size)
            return Bad(absl::StrFormat("\"prompt\" token id %d is outside the vocabulary [0, %d)",
                                       id, limits.vocab_size));
          r.prompt.push_back(static_cast<int32_t>(id));
        }
      } else {
        return Bad("\"prompt\" must be a string or an array of token ids");
      }
    } else if (key == "max_tokens") {
      if (!v.is_number_integer()) return Bad("\"max_tokens\" must be an integer");
      const int64_t n = v.get<int64_t>();
      if (n < 1 || n > limits.context)
        return Bad(absl::StrFormat("\"max_tokens\" must be in [1, %d] (the context), got %d",
                                   limits.context, n));
      r.max_tokens = static_cast<int>(n);
    } else if (key == "temperature") {
      if (!v.is_number() || v.get<double>() < 0)
        return Bad("\"temperature\" must be a number >= 0");
      r.sampling.temperature = v.get<float>();
    } else if (key == "top_p") {
      if (!v.is_number() || !(v.get<double>() > 0 && v.get<double>() <= 1))
        return Bad("\"top_p\" must be a number in (0, 1]");
      r.sampling.top_p = v.get<float>();
    } else if (key == "seed") {
      if (!v.is_number_integer() || (v.is_number_integer() && !v.is_number_unsigned()))
        return Bad("\"seed\" must be an integer >= 0");
      r.sampling.seed = v.get<uint64_t>();
    } else if (key == "stop") {
      if (v.is_string()) {
        r.stop.push_back(v.get<std::string>());
      } else if (v.is_array() && v.size() <= 4 &&
                 std::all_of(v.begin(), v.end(), [](const json& s) { return s.is_string(); })) {
        for (const json& s : v) r.stop.push_back(s.get<std::string>());
      } else {
        return Bad("\"stop\" must be a string or an array of at most 4 strings");
      }
      for (const std::string& s : r.stop)
        if (s.empty()) return Bad("\"stop\" strings must not be empty");
    } else if (key == "stream") {
      if (!v.is_boolean()) return Bad("\"stream\" must be true or false");
      r.stream = v.get<bool>();
    } else if (key == "model" || key == "user") {
      if (!v.is_string()) return Bad("\"" + key + "\" must be a string");  // one model: ignored
    } else if (key == "n") {
      if (!v.is_number_integer() || v.get<int64_t>() != 1) return Bad("\"n\" must be 1");
    } else if (const NeutralField* f = FindNeutralField(key)) {
      if (!f->neutral(v)) return Bad("\"" + key + "\" is not supported: only " + f->only);
    } else {
      return Bad("unknown field \"" + key + "\"");
    }
  }
  if (!has_prompt) return Bad("\"prompt\" is required");
  if (r.prompt.empty()) return Bad("\"prompt\" is empty");
  const int P = static_cast<int>(r.prompt.size());
  if (P >= limits.context)
    return Bad(absl::StrFormat("the prompt has %d tokens; the context of %d leaves no room to "
                               "generate", P, limits.context));
  if (P + r.max_tokens > limits.context)
    return Bad(absl::StrFormat("the prompt's %d tokens and \"max_tokens\" %d exceed the context "
                               "of %d tokens",
                               P, r.max_tokens, limits.context));
  return r;
}

bool CompletionText::Add(int32_t token) {
  if (stopped_) return false;
  if (token == tokenizer_.eos_id()) {
    stopped_ = true;
    return false;
  }
  tokens_.push_back(token);
  if (stop_.empty()) return true;
  // A stop string can only newly match where it ends in what changed.
  const size_t changed = CatchUp();
  size_t cut = std::string::npos;
  for (const std::string& s : stop_)
    cut = std::min(cut, text_.find(s, changed - std::min(changed, s.size() - 1)));
  if (cut != std::string::npos) {
    text_.resize(cut);
    stopped_ = true;
  }
  return !stopped_;
}

const std::string& CompletionText::text() {
  CatchUp();
  return text_;
}

size_t CompletionText::CatchUp() {
  size_t changed = text_.size();
  // Past a stop string nothing is added (Add refuses tokens once stopped).
  while (decoded_ < tokens_.size()) changed = std::min(changed, AppendDecoded(++decoded_));
  return changed;
}

size_t CompletionText::AppendDecoded(size_t n) {
  // Decoding the whole generation at every token cost O(length) a token (160 µs at 1,024 tokens
  // of a SentencePiece model, bench/bench_completion_text.cpp). A token's text depends only on
  // the few tokens before it (SentencePiece drops the space of a text's first piece; byte pieces
  // join into one UTF-8 character, at most 4), so as streaming detokenizers do, the text grows
  // by Decode(context + token) less Decode(context) over kDecodeContext tokens of context. Where
  // the context's text is not a prefix of that (the token completed a character begun in the
  // context), the whole text is decoded again, so text_ is always the Decode of its tokens.
  constexpr size_t kDecodeContext = 6;
  const auto end = tokens_.begin() + n;
  if (n > kDecodeContext + 1) {
    std::vector<int32_t> window(end - (kDecodeContext + 1), end);
    const std::string with = tokenizer_.Decode(window);
    window.pop_back();
    const std::string context = tokenizer_.Decode(window);
    if (with.compare(0, context.size(), context) == 0) {
      const size_t changed = text_.size();
      text_.append(with, context.size(), std::string::npos);
      return changed;
    }
  }
  text_ = tokenizer_.Decode(std::vector<int32_t>(tokens_.begin(), end));
  return 0;
}

std::string CompletionText::Release(bool finished) {
  CatchUp();
  size_t end = text_.size();
  if (!finished && !stopped_) {
    end -= IncompleteUtf8Tail(text_);
    size_t hold = 0;  // the longest tail that is a proper prefix of a stop string
    for (const std::string& s : stop_)
      for (size_t k = std::min(s.size() - 1, end); k > hold; --k)
        if (text_.compare(end - k, k, s, 0, k) == 0) {
          hold = k;
          break;
        }
    end -= hold;
  }
  if (end <= released_) return "";
  std::string out = text_.substr(released_, end - released_);
  released_ = end;
  return out;
}

}  // namespace dmc::inference
