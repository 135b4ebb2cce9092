// Rotary position embedding, rotate-half layout (spec: kernels/rope.h). For a token at position p
// and channel pair (i, i + half), half = D/2, the pair is rotated by the angle
// p · theta^(-2i/D):
//   out[i]        = x[i] cos - x[i+half] sin
//   out[i + half] = x[i] sin + x[i+half] cos
// The map is a rotation, so its Jacobian J is orthogonal and the backward dinp += J^T dout is the
// rotation by the opposite angle.
//
// keep_last_channel (DMC, model/DMC.md §1): channel D-1 is the control channel and must pass through
// unchanged. It is treated as 0 inside the rotation of pair (half-1, D-1) and copied through:
//   out[half-1] = x[half-1] cos,   out[D-1] = x[D-1]
// so in the backward dinp[half-1] += dout[half-1] cos (no contribution from dout[D-1], which does
// not depend on x[half-1]) and dinp[D-1] += dout[D-1]. (Without accumulate, = instead of +=.)
//
// Angles are computed in double here (the CUDA kernel uses fp32, as Hugging Face does).
// out may alias inp (each pair is read before it is written); dinp must not alias dout.
#include "kernels/rope.h"

#include <cmath>
#include <vector>

namespace dmc::kernels {
namespace {

// cos/sin tables [T, half] for positions pos0 .. pos0 + T - 1.
void rope_tables(std::vector<double>& cs, std::vector<double>& sn, int T_, int D, int pos0,
                 float theta) {
  const int half = D / 2;
  cs.resize(static_cast<size_t>(T_) * half);
  sn.resize(cs.size());
  for (int i = 0; i < half; ++i) {
    const double inv_freq = std::pow(static_cast<double>(theta), -2.0 * i / D);
    for (int t = 0; t < T_; ++t) {
      const double angle = static_cast<double>(pos0 + t) * inv_freq;
      cs[static_cast<size_t>(t) * half + i] = std::cos(angle);
      sn[static_cast<size_t>(t) * half + i] = std::sin(angle);
    }
  }
}

// Calls fn(base, c, s) for every (b, t, h) row of a [B, T, H, D] tensor: base the row's offset,
// c and s the cos and sin tables at position pos0 + t.
template <typename Fn>
void ForEachRow(int B, int T_, int H, int D, int pos0, float theta, const Fn& fn) {
  const int half = D / 2;
  std::vector<double> cs, sn;
  rope_tables(cs, sn, T_, D, pos0, theta);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T_; ++t) {
      const double* c = cs.data() + static_cast<size_t>(t) * half;
      const double* s = sn.data() + static_cast<size_t>(t) * half;
      for (int h = 0; h < H; ++h) fn(((static_cast<long>(b) * T_ + t) * H + h) * D, c, s);
    }
}

}  // namespace

template <typename T>
void rope_forward(T* out, const T* inp, int B, int T_, int H, int D, int pos0, float theta,
                  bool keep_last_channel) {
  const int half = D / 2;
  ForEachRow(B, T_, H, D, pos0, theta, [&](long base, const double* c, const double* s) {
    const T* x = inp + base;
    T* o = out + base;
    for (int i = 0; i < half; ++i) {
      const bool ctrl = keep_last_channel && i == half - 1;
      const double x1 = x[i];
      const double x2 = ctrl ? 0.0 : static_cast<double>(x[i + half]);
      const T keep = x[i + half];
      o[i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
      o[i + half] = ctrl ? keep : static_cast<T>(x1 * s[i] + x2 * c[i]);
    }
  });
}

template <typename T>
void rope_backward(T* dinp, const T* dout, int B, int T_, int H, int D, int pos0, float theta,
                   bool keep_last_channel, bool accumulate) {
  const int half = D / 2;
  ForEachRow(B, T_, H, D, pos0, theta, [&](long base, const double* c, const double* s) {
    const T* d = dout + base;
    T* dx = dinp + base;
    auto put = [&](int i, double g) {
      dx[i] = accumulate ? dx[i] + static_cast<T>(g) : static_cast<T>(g);
    };
    for (int i = 0; i < half; ++i) {
      const double d1 = d[i], d2 = d[i + half];
      if (keep_last_channel && i == half - 1) {
        put(i, d1 * c[i]);
        put(i + half, d2);
      } else {
        put(i, d1 * c[i] + d2 * s[i]);
        put(i + half, -d1 * s[i] + d2 * c[i]);
      }
    }
  });
}

template void rope_forward<float>(float*, const float*, int, int, int, int, int, float, bool);
template void rope_forward<double>(double*, const double*, int, int, int, int, int, float, bool);
template void rope_backward<float>(float*, const float*, int, int, int, int, int, float, bool,
                                   bool);
template void rope_backward<double>(double*, const double*, int, int, int, int, int, float, bool,
                                    bool);

}  // namespace dmc::kernels
