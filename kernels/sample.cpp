#include "kernels/sample.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace dmc::kernels {

// Straight from the definition in sample.h, in double; the nucleus threshold by sorting.
template <typename T>
void sample_tokens(int32_t* next, float* logprob, int32_t* argmax, const T* logits, int n, int V,
                   const SampleRows& rows) {
  std::vector<double> p(V), sorted(V);
  for (int i = 0; i < n; ++i) {
    const T* l = logits + static_cast<long>(i) * V;
    const int32_t best = static_cast<int32_t>(std::max_element(l, l + V) - l);
    const double max_l = l[best];
    int32_t chosen = best;
    const float temperature = rows.temperature[i];
    if (temperature > 0) {
      double total = 0;
      for (int v = 0; v < V; ++v) total += p[v] = std::exp((l[v] - max_l) / temperature);
      sorted = p;
      std::sort(sorted.begin(), sorted.end(), [](double a, double b) { return a > b; });
      double mass = 0, tau = sorted[0];
      for (double s : sorted) {
        mass += s;
        tau = s;
        if (mass >= rows.top_p[i] * total) break;
      }
      double nucleus = 0;
      for (int v = 0; v < V; ++v) nucleus += p[v] >= tau ? p[v] : 0.0;
      const double cut = SampleUniform(rows.seed[i], rows.position[i]) * nucleus;
      double acc = 0;
      for (int v = 0; v < V; ++v) {
        if (p[v] < tau) continue;
        chosen = v;
        if ((acc += p[v]) > cut) break;
      }
    }
    if (next) next[i] = chosen;
    if (argmax) argmax[i] = best;
    if (logprob) {
      double sum = 0;
      for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(l[v]) - max_l);
      const int32_t t = rows.target && rows.target[i] >= 0 ? rows.target[i] : chosen;
      logprob[i] = static_cast<float>(l[t] - max_l - std::log(sum));
    }
  }
}

template void sample_tokens<float>(int32_t*, float*, int32_t*, const float*, int, int,
                                   const SampleRows&);
template void sample_tokens<double>(int32_t*, float*, int32_t*, const double*, int, int,
                                    const SampleRows&);

void take_previous_choices(int32_t* tokens, const int32_t* previous, int n) {
  for (int i = 0; i < n; ++i)
    if (tokens[i] < 0) tokens[i] = previous[i];
}

}  // namespace dmc::kernels
