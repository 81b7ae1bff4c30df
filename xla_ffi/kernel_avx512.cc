// AVX-512 implementation of the primitive loops (see kernel.h).
//
// Every function carries its own target attribute; this file is compiled with
// the project's ordinary flags, so nothing here can leak AVX-512 instructions
// into code that runs before dispatch has checked the CPU. The summation order
// is the canonical 16-lane one of kernel_scalar.cc, so both are bit-identical.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernel.h"

#define SIGNEDCUT_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,fma,popcnt,bmi2")))

namespace signedcut {
namespace {

inline int64_t RoundUp16(int64_t x) { return (x + 15) / 16 * 16; }

SIGNEDCUT_AVX512 inline __mmask16 TailMask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF)
                         : static_cast<__mmask16>((1u << remaining) - 1u);
}

// The 16 sign bits of elements j..j+15 (j a multiple of 16).
inline __mmask16 SignMask(const uint32_t* bits, int64_t j) {
  return static_cast<__mmask16>(bits[j >> 5] >> (j & 16));
}

SIGNEDCUT_AVX512 inline float SumLanes(__m512 v) {
  alignas(64) float a[kLanes];
  _mm512_store_ps(a, v);
  float s = a[0];
  for (int l = 1; l < kLanes; ++l) s += a[l];
  return s;
}

SIGNEDCUT_AVX512 inline double SumLanes(__m512d lo, __m512d hi) {
  alignas(64) double a[kLanes];
  _mm512_store_pd(a, lo);
  _mm512_store_pd(a + 8, hi);
  double s = a[0];
  for (int l = 1; l < kLanes; ++l) s += a[l];
  return s;
}

// acc ± x per lane: − where the sign bit is set.
SIGNEDCUT_AVX512 inline __m512 SignedAdd(__m512 acc, __m512 x, __mmask16 neg) {
  return _mm512_mask_sub_ps(_mm512_add_ps(acc, x), neg, acc, x);
}

// y[i] += Σ_{g < G} coef[g]·rows[g][i], the rows added one after another (so
// the sum is the scalar table's), while the next G rows are prefetched.
template <int G>
SIGNEDCUT_AVX512 inline void AddRowGroup(float* y, const float* const* rows, const float* coef,
                                         const float* const* next, int64_t len) {
  __m512 c[G];
  for (int g = 0; g < G; ++g) c[g] = _mm512_set1_ps(coef[g]);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    if (next != nullptr) {
      for (int g = 0; g < G; ++g) {
        _mm_prefetch(reinterpret_cast<const char*>(next[g] + i), _MM_HINT_T0);
      }
    }
    __m512 v = _mm512_loadu_ps(y + i);
    for (int g = 0; g < G; ++g) v = _mm512_add_ps(v, _mm512_mul_ps(c[g], _mm512_loadu_ps(rows[g] + i)));
    _mm512_storeu_ps(y + i, v);
  }
  if (i < len) {
    const __mmask16 k = TailMask(len - i);
    __m512 v = _mm512_maskz_loadu_ps(k, y + i);
    for (int g = 0; g < G; ++g) {
      v = _mm512_add_ps(v, _mm512_mul_ps(c[g], _mm512_maskz_loadu_ps(k, rows[g] + i)));
    }
    _mm512_mask_storeu_ps(y + i, k, v);
  }
}

SIGNEDCUT_AVX512 void AddRows(float* y, const float* const* rows, const float* coef,
                              int64_t count, int64_t len) {
  // Eight rows per pass over y: y (up to 56 KiB at 14336 entries) makes one
  // round trip per eight rows instead of per four. Flipped rows are
  // scattered: the next group's rows are fetched one group ahead, line by
  // line, instead of waiting for the hardware prefetcher to notice each new
  // stream.
  int64_t r = 0;
  for (; r + 8 <= count; r += 8) {
    AddRowGroup<8>(y, rows + r, coef + r, r + 16 <= count ? rows + r + 8 : nullptr, len);
  }
  for (; r + 4 <= count; r += 4) AddRowGroup<4>(y, rows + r, coef + r, nullptr, len);
  for (; r < count; ++r) AddRowGroup<1>(y, rows + r, coef + r, nullptr, len);
}

SIGNEDCUT_AVX512 void SignedRowdots(float* out, const float* m, int64_t ld, int64_t rows,
                                    const uint32_t* bits, int64_t len) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float* p = m + r * ld;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 k = TailMask(len - j);
      const __mmask16 neg = SignMask(bits, j) & k;
      a0 = SignedAdd(a0, _mm512_maskz_loadu_ps(k, p + j), neg);
      a1 = SignedAdd(a1, _mm512_maskz_loadu_ps(k, p + ld + j), neg);
      a2 = SignedAdd(a2, _mm512_maskz_loadu_ps(k, p + 2 * ld + j), neg);
      a3 = SignedAdd(a3, _mm512_maskz_loadu_ps(k, p + 3 * ld + j), neg);
    }
    out[r] = SumLanes(a0);
    out[r + 1] = SumLanes(a1);
    out[r + 2] = SumLanes(a2);
    out[r + 3] = SumLanes(a3);
  }
  for (; r < rows; ++r) {
    const float* p = m + r * ld;
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 k = TailMask(len - j);
      a0 = SignedAdd(a0, _mm512_maskz_loadu_ps(k, p + j), SignMask(bits, j) & k);
    }
    out[r] = SumLanes(a0);
  }
}

SIGNEDCUT_AVX512 void FinishImage(const float* base, int64_t len, const uint32_t* pend_bits,
                                  int64_t stride, int64_t word0, const float* coef,
                                  int64_t npend, uint32_t* out_bits, double* norms) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  const int64_t nwords = (len + 31) / 32;
  for (int64_t wi = 0; wi < nwords; ++wi) {
    const int64_t i = wi * 32;
    const __mmask16 k0 = TailMask(len - i);
    const __mmask16 k1 = len - i > 16 ? TailMask(len - i - 16) : static_cast<__mmask16>(0);
    __m512 y0 = _mm512_maskz_loadu_ps(k0, base + i);
    __m512 y1 = _mm512_maskz_loadu_ps(k1, base + i + 16);
    for (int64_t k = 0; k < npend; ++k) {
      const uint32_t b = pend_bits[k * stride + word0 + wi];
      const __m512 c = _mm512_set1_ps(coef[k]);
      y0 = _mm512_mask_add_ps(_mm512_sub_ps(y0, c), static_cast<__mmask16>(b), y0, c);
      y1 = _mm512_mask_add_ps(_mm512_sub_ps(y1, c), static_cast<__mmask16>(b >> 16), y1, c);
    }
    const uint32_t n0 = _mm512_mask_cmp_ps_mask(k0, y0, _mm512_setzero_ps(), _CMP_LT_OQ);
    const uint32_t n1 = _mm512_mask_cmp_ps_mask(k1, y1, _mm512_setzero_ps(), _CMP_LT_OQ);
    out_bits[wi] = n0 | (n1 << 16);
    // Lanes past the end hold garbage: zero them before summing.
    const __m512 a0 = _mm512_maskz_and_ps(k0, y0, abs_mask);
    const __m512 a1 = _mm512_maskz_and_ps(k1, y1, abs_mask);
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(a0)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a0), 1))));
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(a1)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a1), 1))));
    const int64_t end = (wi + 1) * 32;
    if (end % kChunk == 0 || wi == nwords - 1) {
      norms[(end - 1) / kChunk] = SumLanes(lo, hi);
      lo = _mm512_setzero_pd();
      hi = _mm512_setzero_pd();
    }
  }
}

SIGNEDCUT_AVX512 void XorPopcounts(int64_t* out, const uint32_t* a, int64_t stride,
                                   int64_t count, const uint32_t* b, int64_t nwords) {
  for (int64_t k = 0; k < count; ++k) {
    const uint32_t* ak = a + k * stride;
    __m512i acc = _mm512_setzero_si512();
    for (int64_t w = 0; w < nwords; w += 16) {
      const __mmask16 m = TailMask(nwords - w);
      const __m512i x = _mm512_xor_si512(_mm512_maskz_loadu_epi32(m, ak + w),
                                         _mm512_maskz_loadu_epi32(m, b + w));
      acc = _mm512_add_epi32(acc, _mm512_popcnt_epi32(x));
    }
    out[k] = _mm512_reduce_add_epi32(acc);
  }
}

// sq += x² per lane, in double (the square of a float is exact there).
SIGNEDCUT_AVX512 inline void Square(__m512 x, __m512d* sq_lo, __m512d* sq_hi) {
  const __m512d l = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
  const __m512d h =
      _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  *sq_lo = _mm512_fmadd_pd(l, l, *sq_lo);
  *sq_hi = _mm512_fmadd_pd(h, h, *sq_hi);
}

// One tile: `nr` (1..4) rows × up to 32 columns starting at j.
template <int NR>
SIGNEDCUT_AVX512 inline void FlushTile(float* m, int64_t ld, int64_t j, int64_t len,
                                       const float* left, int64_t p, const float* right,
                                       int64_t ldr, __m512* dot, __m512d* sq_lo,
                                       __m512d* sq_hi, const uint32_t* dot_bits) {
  const __mmask16 k0 = TailMask(len - j);
  const __mmask16 k1 = len - j > 16 ? TailMask(len - j - 16) : static_cast<__mmask16>(0);
  __m512 x0[NR], x1[NR];
  for (int r = 0; r < NR; ++r) {
    x0[r] = _mm512_maskz_loadu_ps(k0, m + r * ld + j);
    x1[r] = _mm512_maskz_loadu_ps(k1, m + r * ld + j + 16);
  }
  for (int64_t k = 0; k < p; ++k) {
    const __m512 t0 = _mm512_maskz_loadu_ps(k0, right + k * ldr + j);
    const __m512 t1 = _mm512_maskz_loadu_ps(k1, right + k * ldr + j + 16);
    for (int r = 0; r < NR; ++r) {
      const __m512 a = _mm512_set1_ps(left[r * p + k]);
      x0[r] = _mm512_fnmadd_ps(a, t0, x0[r]);  // exact product: a·(±1)
      x1[r] = _mm512_fnmadd_ps(a, t1, x1[r]);
    }
  }
  const __mmask16 n0 = SignMask(dot_bits, j) & k0;
  const __mmask16 n1 = (len - j > 16 ? SignMask(dot_bits, j + 16) : 0) & k1;
  for (int r = 0; r < NR; ++r) {
    _mm512_mask_storeu_ps(m + r * ld + j, k0, x0[r]);
    _mm512_mask_storeu_ps(m + r * ld + j + 16, k1, x1[r]);
    dot[r] = SignedAdd(dot[r], x0[r], n0);
    Square(x0[r], &sq_lo[r], &sq_hi[r]);
    Square(x1[r], &sq_lo[r], &sq_hi[r]);
    if (k1) dot[r] = SignedAdd(dot[r], x1[r], n1);
  }
}

template <int NR>
SIGNEDCUT_AVX512 inline void FlushRowGroup(float* m, int64_t ld, int64_t len, const float* left,
                                           int64_t p, const float* right, int64_t ldr,
                                           const uint32_t* dot_bits, float* dots,
                                           double* sumsq) {
  __m512 dot[NR];
  __m512d sq_lo[NR], sq_hi[NR];
  for (int r = 0; r < NR; ++r) {
    dot[r] = _mm512_setzero_ps();
    sq_lo[r] = _mm512_setzero_pd();
    sq_hi[r] = _mm512_setzero_pd();
  }
  for (int64_t j = 0; j < len; j += 32) {
    FlushTile<NR>(m, ld, j, len, left, p, right, ldr, dot, sq_lo, sq_hi, dot_bits);
  }
  for (int r = 0; r < NR; ++r) {
    dots[r] = SumLanes(dot[r]);
    if (sumsq != nullptr) sumsq[r] = SumLanes(sq_lo[r], sq_hi[r]);
  }
}

SIGNEDCUT_AVX512 void FlushRows(float* m, int64_t ld, int64_t rows, int64_t len,
                                const float* left, int64_t p, const float* right, int64_t ldr,
                                const uint32_t* dot_bits, float* dots, double* sumsq) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    FlushRowGroup<4>(m + r * ld, ld, len, left + r * p, p, right, ldr, dot_bits, dots + r,
                     sumsq ? sumsq + r : nullptr);
  }
  for (; r < rows; ++r) {
    FlushRowGroup<1>(m + r * ld, ld, len, left + r * p, p, right, ldr, dot_bits, dots + r,
                     sumsq ? sumsq + r : nullptr);
  }
}

// 16 lanes of x·row for rows r0.. (nr ≤ 4) and vectors k0.. (nk ≤ 4) over
// columns [j0, j1), added to acc (4 × 4 chains).
SIGNEDCUT_AVX512 inline void RowdotsBlock(__m512 (&acc)[4][4], const float* m, int64_t ld,
                                          int nr, const float* x, int64_t ldx, int nk,
                                          int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; j += 16) {
    const __mmask16 k = TailMask(j1 - j);
    __m512 xs[4];
    for (int b = 0; b < 4; ++b) {
      xs[b] = b < nk ? _mm512_maskz_loadu_ps(k, x + b * ldx + j) : _mm512_setzero_ps();
    }
    for (int a = 0; a < 4; ++a) {
      if (a >= nr) break;
      const __m512 v = _mm512_maskz_loadu_ps(k, m + a * ld + j);
      for (int b = 0; b < 4; ++b) acc[a][b] = _mm512_fmadd_ps(v, xs[b], acc[a][b]);
    }
  }
}

SIGNEDCUT_AVX512 void MultiRowdots(float* out, int64_t ldo, const float* m, int64_t ld,
                                   int64_t rows, const float* x, int64_t ldx, int64_t q,
                                   int64_t len) {
  // 4 rows × 4 vectors per pass: 16 independent accumulator chains. The
  // columns go in blocks of kCols, so that the block of all q vectors (up to
  // 32 × 8 KiB) stays in L2 while the 4 rows pass them; each chain still adds
  // its columns in order (the partial sums wait in `saved`), as the scalar
  // table does. More than kMaxQ vectors: one block.
  constexpr int64_t kCols = 2048, kMaxQ = 32;
  const int64_t cols = q <= kMaxQ ? kCols : RoundUp16(len);
  alignas(64) float saved[kMaxQ / 4][4][4][kLanes];
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const int nr = static_cast<int>(std::min<int64_t>(4, rows - r0));
    for (int64_t j0 = 0; j0 < len; j0 += cols) {
      const int64_t j1 = std::min(len, j0 + cols);
      const bool first = j0 == 0, last = j1 == len;
      for (int64_t k0 = 0; k0 < q; k0 += 4) {
        const int nk = static_cast<int>(std::min<int64_t>(4, q - k0));
        __m512 acc[4][4];
        for (int a = 0; a < 4; ++a)
          for (int b = 0; b < 4; ++b)
            acc[a][b] = first ? _mm512_setzero_ps() : _mm512_load_ps(saved[k0 / 4 % (kMaxQ / 4)][a][b]);
        RowdotsBlock(acc, m + r0 * ld, ld, nr, x + k0 * ldx, ldx, nk, j0, j1);
        if (last) {
          for (int a = 0; a < nr; ++a)
            for (int b = 0; b < nk; ++b) out[(k0 + b) * ldo + r0 + a] = SumLanes(acc[a][b]);
        } else {
          for (int a = 0; a < 4; ++a)
            for (int b = 0; b < 4; ++b) _mm512_store_ps(saved[k0 / 4][a][b], acc[a][b]);
        }
      }
    }
  }
}

}  // namespace

const Kernels& Avx512Kernels() {
  static const Kernels k = {"avx512",     AddRows,   SignedRowdots, FinishImage,
                            XorPopcounts, FlushRows, MultiRowdots};
  return k;
}

}  // namespace signedcut
