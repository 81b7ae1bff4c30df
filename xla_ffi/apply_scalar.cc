// Portable cores of the packed-apply kernel (see apply_kernel.h). Built
// without any target attribute: this is the fallback on every x86-64 and the
// reference the AVX-512 cores are tested against.
#include <cstdint>

#include "apply_kernel.h"

namespace signedcut {
namespace {

inline uint32_t TailMask(int64_t d) {
  const int64_t r = d % 32;
  return r == 0 ? 0xFFFFFFFFu : ((1u << r) - 1u);
}

}  // namespace

void ApplyProjectScalar(const ApplyArgs& a, int64_t j0, int64_t j1) {
  const int64_t mw = (a.m + 31) / 32;
  const uint32_t tail = TailMask(a.m);
  for (int64_t j = j0; j < j1; ++j) {
    const uint32_t* bits = a.s_bits + j * mw;
    for (int64_t r = 0; r < a.rows; ++r) {
      const float* x = a.x + r * a.m;
      float neg = 0.0f;  // Σ of the entries whose sign in s_j is −1
      for (int64_t k = 0; k < mw; ++k) {
        uint32_t b = k == mw - 1 ? (bits[k] & tail) : bits[k];
        while (b != 0) {
          neg += x[k * 32 + __builtin_ctz(b)];
          b &= b - 1;
        }
      }
      a.p[r * a.w + j] = a.c[j] * (a.row_sums[r] - 2.0f * neg);
    }
  }
}

void ApplyExpandScalar(const ApplyArgs& a, int64_t j0, int64_t j1, float* y_out) {
  const int64_t nw = (a.n + 31) / 32;
  const uint32_t tail = TailMask(a.n);
  for (int64_t r = 0; r < a.rows; ++r) {
    float* y = y_out + r * a.n;
    const float* p = a.p + r * a.w;
    for (int64_t j = j0; j < j1; ++j) {
      const float pj = p[j];
      const uint32_t* bits = a.t_bits + j * nw;
      for (int64_t k = 0; k < nw; ++k) {
        uint32_t b = k == nw - 1 ? (bits[k] & tail) : bits[k];
        while (b != 0) {
          y[k * 32 + __builtin_ctz(b)] += pj;  // Σ of p_j over cuts with t_j[i] = −1
          b &= b - 1;
        }
      }
    }
  }
}

}  // namespace signedcut
