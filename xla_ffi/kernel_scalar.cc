// Portable implementation of the primitive loops (see kernel.h).
//
// Written lane by lane so that it reproduces the AVX-512 table's summation
// order exactly: results are bit-identical, and this file is the readable
// statement of what kernel_avx512.cc computes.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernel.h"

namespace signedcut {
namespace {

inline uint32_t Bit(const uint32_t* bits, int64_t i) {
  return (bits[i >> 5] >> (i & 31)) & 1u;
}

// v[byte][i] = +1 where bit i of byte is set, else −1.
struct SignTable {
  float v[256][8];
  constexpr SignTable() : v() {
    for (int x = 0; x < 256; ++x)
      for (int i = 0; i < 8; ++i) v[x][i] = ((x >> i) & 1) ? 1.0f : -1.0f;
  }
};
constexpr SignTable kPlusWhereSet;

inline float SumLanes(const float* acc) {
  float s = acc[0];
  for (int l = 1; l < kLanes; ++l) s += acc[l];
  return s;
}

inline double SumLanes(const double* acc) {
  double s = acc[0];
  for (int l = 1; l < kLanes; ++l) s += acc[l];
  return s;
}

void AddRows(float* y, const float* const* rows, const float* coef, int64_t count,
             int64_t len) {
  for (int64_t r = 0; r < count; ++r) {
    const float c = coef[r];
    const float* row = rows[r];
    for (int64_t i = 0; i < len; ++i) y[i] += c * row[i];
  }
}

void SignedRowdots(float* out, const float* m, int64_t ld, int64_t rows,
                   const uint32_t* bits, int64_t len) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = m + r * ld;
    float acc[kLanes] = {};
    for (int64_t j0 = 0; j0 < len; j0 += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const int64_t j = j0 + l;
        // Past the end the vector code adds +0 with a + sign: do the same.
        const float x = j < len ? row[j] : 0.0f;
        const uint32_t b = j < len ? Bit(bits, j) : 0u;
        acc[l] = b ? acc[l] - x : acc[l] + x;
      }
    }
    out[r] = SumLanes(acc);
  }
}

void FinishImage(const float* base, int64_t len, const uint32_t* pend_bits, int64_t stride,
                 int64_t word0, const float* coef, int64_t npend, uint32_t* out_bits,
                 double* norms) {
  double lanes[kLanes] = {};
  const int64_t nwords = (len + 31) / 32;
  for (int64_t wi = 0; wi < nwords; ++wi) {
    const int nb = static_cast<int>(std::min<int64_t>(32, len - wi * 32));
    float y[32];
    for (int b = 0; b < nb; ++b) y[b] = base[wi * 32 + b];
    // Each element sees the pending cuts k in order, as in the vector code.
    for (int64_t k = 0; k < npend; ++k) {
      const uint32_t bits = pend_bits[k * stride + word0 + wi];
      const float c = coef[k];
      // sign −1 (bit 1): y − c·(−1) = y + c. c·(±1) is exact, so y + c·(±1)
      // is y ± c; the byte table keeps the loop branch-free.
      for (int b = 0; b < nb; ++b) y[b] += c * kPlusWhereSet.v[(bits >> (b & ~7)) & 0xFF][b & 7];
    }
    uint32_t word = 0;
    for (int b = 0; b < nb; ++b) {
      if (y[b] < 0.0f) word |= 1u << b;
      lanes[b % kLanes] += static_cast<double>(std::fabs(y[b]));
    }
    out_bits[wi] = word;
    const int64_t end = (wi + 1) * 32;
    if (end % kChunk == 0 || wi == nwords - 1) {
      norms[(end - 1) / kChunk] = SumLanes(lanes);
      for (double& l : lanes) l = 0.0;
    }
  }
}

void XorPopcounts(int64_t* out, const uint32_t* a, int64_t stride, int64_t count,
                  const uint32_t* b, int64_t nwords) {
  for (int64_t k = 0; k < count; ++k) {
    int64_t s = 0;
    for (int64_t w = 0; w < nwords; ++w) {
      s += __builtin_popcount(a[k * stride + w] ^ b[w]);
    }
    out[k] = s;
  }
}

void FlushRows(float* m, int64_t ld, int64_t rows, int64_t len, const float* left, int64_t p,
               const float* right, int64_t ldr, const uint32_t* dot_bits, float* dots,
               double* sumsq) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = m + r * ld;
    const float* a = left + r * p;
    // k outer, j inner: every element still sees the cuts in order k = 0..p-1.
    for (int64_t k = 0; k < p; ++k) {
      const float ak = a[k];
      const float* rk = right + k * ldr;
      for (int64_t j = 0; j < len; ++j) row[j] -= ak * rk[j];
    }
    float acc[kLanes] = {};
    double sq[kLanes] = {};
    for (int64_t j0 = 0; j0 < len; j0 += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const int64_t j = j0 + l;
        const float x = j < len ? row[j] : 0.0f;
        const uint32_t b = j < len ? Bit(dot_bits, j) : 0u;
        acc[l] = b ? acc[l] - x : acc[l] + x;
        sq[l] += static_cast<double>(x) * static_cast<double>(x);
      }
    }
    dots[r] = SumLanes(acc);
    if (sumsq != nullptr) sumsq[r] = SumLanes(sq);
  }
}

void MultiRowdots(float* out, int64_t ldo, const float* m, int64_t ld, int64_t rows,
                  const float* x, int64_t ldx, int64_t q, int64_t len) {
  const int64_t full = len / kLanes * kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = m + r * ld;
    for (int64_t k = 0; k < q; ++k) {
      const float* xk = x + k * ldx;
      float acc[kLanes] = {};
      // row·(±1) is exact, so acc + row·x is acc ± row; branch-free so that
      // the compiler vectorizes it.
      for (int64_t j0 = 0; j0 < full; j0 += kLanes) {
        for (int l = 0; l < kLanes; ++l) acc[l] += row[j0 + l] * xk[j0 + l];
      }
      if (full < len) {  // past the end add +0 like the vector code
        for (int l = 0; l < kLanes; ++l) {
          const int64_t j = full + l;
          acc[l] += j < len ? row[j] * xk[j] : 0.0f;
        }
      }
      out[k * ldo + r] = SumLanes(acc);
    }
  }
}

}  // namespace

const Kernels& ScalarKernels() {
  static const Kernels k = {"scalar", AddRows, SignedRowdots, FinishImage,
                            XorPopcounts, FlushRows,     MultiRowdots};
  return k;
}

}  // namespace signedcut
