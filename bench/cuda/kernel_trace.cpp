// CUPTI activity tracing for bench/cuda/kernel_trace.h: kernel and copy records arrive in buffers
// CUPTI asks for and hands back (on its own thread); they are reduced to (name, start, end).
#include "bench/cuda/kernel_trace.h"

#include <cupti.h>
#include <cxxabi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace dmc::bench {
namespace {

struct Interval {
  std::string name;
  unsigned long long start, end;
};

std::mutex records_mutex;
std::vector<Interval> records;

void Check(CUptiResult result, const char* what) {
  if (result == CUPTI_SUCCESS) return;
  const char* message = nullptr;
  cuptiGetResultString(result, &message);
  std::fprintf(stderr, "kernel trace: %s: %s\n", what, message ? message : "unknown CUPTI error");
  std::exit(1);
}

// "void dmc::cuda::(anonymous namespace)::decode_kernel<64, (dmc::cuda::Src)0>(dmc::Params)"
// -> "decode_kernel<64, (dmc::cuda::Src)0>": the name after the return type and namespaces,
// without the arguments (brackets inside template arguments kept).
std::string ShortName(const char* mangled) {
  int status = 0;
  char* demangled = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  const std::string name = status == 0 && demangled ? demangled : mangled;
  std::free(demangled);
  int angle = 0, round = 0;
  size_t begin = 0, end = name.size();
  for (size_t i = 0; i < name.size() && end == name.size(); ++i) {
    const char ch = name[i];
    if (ch == '<') ++angle;
    if (ch == '>') --angle;
    if (angle > 0) continue;
    if (ch == '(') {
      // "(anonymous namespace)" is part of the qualified name; any other bracket opens the
      // arguments
      if (name.compare(i, 21, "(anonymous namespace)") == 0) {
        i += 20;
        continue;
      }
      if (round == 0) end = i;
      ++round;
    }
    if (ch == ' ') begin = i + 1;  // after the return type
    if (ch == ':' && i + 1 < name.size() && name[i + 1] == ':') begin = i + 2;
  }
  return name.substr(begin, end - begin);
}

const char* CopyName(uint8_t kind) {
  switch (kind) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "[copy host to device]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "[copy device to host]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "[copy device to device]";
    default: return "[copy other]";
  }
}

constexpr size_t kBufferBytes = 8 << 20;

void CUPTIAPI BufferRequested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = kBufferBytes;
  *max_records = 0;
}

void CUPTIAPI BufferCompleted(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* record = nullptr;
  std::vector<Interval> found;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
      const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
      found.push_back({ShortName(k->name), k->start, k->end});
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(record);
      found.push_back({CopyName(m->copyKind), m->start, m->end});
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(record);
      found.push_back({"[memset]", m->start, m->end});
    }
  }
  std::free(buffer);
  std::lock_guard<std::mutex> lock(records_mutex);
  records.insert(records.end(), found.begin(), found.end());
}

constexpr CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
                                         CUPTI_ACTIVITY_KIND_MEMCPY, CUPTI_ACTIVITY_KIND_MEMSET};

}  // namespace

void KernelTrace::Start() {
  if (recording_) return;
  static bool registered = false;
  if (!registered) {
    Check(cuptiActivityRegisterCallbacks(BufferRequested, BufferCompleted), "register callbacks");
    registered = true;
  }
  {
    std::lock_guard<std::mutex> lock(records_mutex);
    records.clear();
  }
  for (CUpti_ActivityKind kind : kKinds) Check(cuptiActivityEnable(kind), "enable activity");
  Check(cuptiGetTimestamp(&start_ns_), "timestamp");
  recording_ = true;
}

void KernelTrace::Stop() {
  if (!recording_) return;
  uint64_t end_ns = 0;
  Check(cuptiGetTimestamp(&end_ns), "timestamp");
  for (CUpti_ActivityKind kind : kKinds) Check(cuptiActivityDisable(kind), "disable activity");
  Check(cuptiActivityFlushAll(1), "flush");
  window_ns_ = static_cast<double>(end_ns - start_ns_);
  recording_ = false;
}

void KernelTrace::Print(const char* title, long per) const {
  std::lock_guard<std::mutex> lock(records_mutex);
  struct Total {
    long calls = 0;
    double ns = 0;
  };
  std::map<std::string, Total> totals;
  std::vector<std::pair<unsigned long long, unsigned long long>> spans;
  for (const Interval& r : records) {
    Total& t = totals[r.name];
    ++t.calls;
    t.ns += static_cast<double>(r.end - r.start);
    spans.emplace_back(r.start, r.end);
  }
  // the GPU's busy time: the union of the intervals (graph nodes may overlap); the idle gaps
  // between them by length: a few µs is the device's own gap between dependent graph nodes, tens
  // of µs a host round trip or a launch, more the host's work between steps
  std::sort(spans.begin(), spans.end());
  constexpr double kGapBounds[] = {4e3, 50e3};  // ns
  struct Gaps {
    long count = 0;
    double ns = 0;
  } gaps[3];
  double busy = 0;
  unsigned long long open = 0, close = 0;
  for (auto [s, e] : spans) {
    if (s > close) {
      busy += static_cast<double>(close - open);
      if (close > 0) {
        const double gap = static_cast<double>(s - close);
        Gaps& g = gaps[gap < kGapBounds[0] ? 0 : gap < kGapBounds[1] ? 1 : 2];
        ++g.count;
        g.ns += gap;
      }
      open = s;
    }
    close = std::max(close, e);
  }
  busy += static_cast<double>(close - open);
  std::vector<std::pair<std::string, Total>> rows(totals.begin(), totals.end());
  std::sort(rows.begin(), rows.end(),
            [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
  std::printf("\n%s: %.1f ms of wall time, the GPU busy %.1f%% of it\n", title,
              window_ns_ * 1e-6, 100 * busy / std::max(1.0, window_ns_));
  const double steps = per > 0 ? static_cast<double>(per) : 1.0;
  std::printf("idle between the first and last record%s: %.3f ms in %.1f gaps under 4 µs, "
              "%.3f ms in %.1f of 4–50 µs, %.3f ms in %.1f of 50 µs or more\n\n",
              per > 0 ? ", per step" : "", gaps[0].ns * 1e-6 / steps, gaps[0].count / steps,
              gaps[1].ns * 1e-6 / steps, gaps[1].count / steps, gaps[2].ns * 1e-6 / steps,
              gaps[2].count / steps);
  std::printf("| kernel | calls | total ms |%s share of wall |\n| --- | ---: | ---: |%s ---: |\n",
              per > 0 ? " ms per step |" : "", per > 0 ? " ---: |" : "");
  for (const auto& [name, t] : rows) {
    std::printf("| %s | %ld | %.2f |", name.c_str(), t.calls, t.ns * 1e-6);
    if (per > 0) std::printf(" %.3f |", t.ns * 1e-6 / per);
    std::printf(" %.1f%% |\n", 100 * t.ns / std::max(1.0, window_ns_));
  }
  std::fflush(stdout);
}

}  // namespace dmc::bench
