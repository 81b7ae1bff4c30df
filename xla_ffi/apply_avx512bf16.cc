// AVX512-BF16 (VDPBF16PS) micro-kernels of the bf16 apply paths, for CPUs
// without AMX (see apply_bf16.h): they read the same tiles as the AMX cores,
// one 64-byte tile row per zmm, the other operand as a broadcast bf16 pair.
// Every function carries its own target attribute.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "apply_bf16.h"

#define SIGNEDCUT_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

namespace signedcut {
namespace {

SIGNEDCUT_BF16 inline __m512 Dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh&>(a), reinterpret_cast<__m512bh&>(b));
}

SIGNEDCUT_BF16 inline __m512i Pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

void Begin(int, int64_t) {}
void End() {}

// One 16-cut block × one batch tile: acc[c] (nb lanes) = C row c.
SIGNEDCUT_BF16 void ProjectOne(const uint16_t* sx, const uint16_t* xv, int64_t xv_kb,
                               int64_t nkb, float* c, int64_t nb, bool load) {
  const __mmask16 lanes = nb >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nb) - 1u);
  __m512 acc[16];
#pragma GCC unroll 16
  for (int q = 0; q < 16; ++q) {
    acc[q] = load ? _mm512_maskz_loadu_ps(lanes, c + q * nb) : _mm512_setzero_ps();
  }
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const uint16_t* s = sx + kb * 512;
    const uint16_t* x = xv + kb * xv_kb;
    for (int r = 0; r < 16; ++r) {
      const __m512i xr = _mm512_maskz_loadu_epi32(lanes, x + r * 2 * nb);
#pragma GCC unroll 16
      for (int q = 0; q < 16; ++q) acc[q] = Dp(acc[q], Pair(s + q * 32 + 2 * r), xr);
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < 16; ++q) _mm512_mask_storeu_ps(c + q * nb, lanes, acc[q]);
}

SIGNEDCUT_BF16 void Project(const uint16_t* sx, int64_t sx_cb, const uint16_t* xv,
                            int64_t xv_kb, int64_t nkb, float* c, int64_t c_cb, int64_t c_bt,
                            int64_t nb, bool two_c, bool two_b, bool load) {
  for (int i = 0; i < (two_c ? 2 : 1); ++i) {
    for (int j = 0; j < (two_b ? 2 : 1); ++j) {
      ProjectOne(sx + i * sx_cb, xv + j * 32 * nb, xv_kb, nkb, c + i * c_cb + j * c_bt, nb,
                 load);
    }
  }

}

// kR rows (b0.. of one batch tile) × one or two column tiles of Y. p points
// at the batch tile's P tile (kk 0, hi), y at its Y tile (ct0). kLo: add the
// P_lo products too.
template <int kR, bool kLo>
SIGNEDCUT_BF16 void ExpandRows(const uint16_t* p, int64_t b0, const uint16_t* tx, int64_t tx_ct,
                               int64_t nkk, float* y, int64_t nb, bool two_n, bool load) {
  const int64_t p_kk = 64 * nb, p_lo = 32 * nb;
  __m512 acc[kR][2];
#pragma GCC unroll 8
  for (int b = 0; b < kR; ++b) {
    acc[b][0] = load ? _mm512_loadu_ps(y + (b0 + b) * 16) : _mm512_setzero_ps();
    acc[b][1] = two_n && load ? _mm512_loadu_ps(y + 16 * nb + (b0 + b) * 16)
                              : _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < nkk; ++kk) {
    const uint16_t* pk = p + kk * p_kk + b0 * 32;
    for (int r = 0; r < 16; ++r) {
      const __m512i t0 = _mm512_loadu_si512(tx + kk * 512 + r * 32);
      const __m512i t1 = two_n ? _mm512_loadu_si512(tx + tx_ct + kk * 512 + r * 32) : t0;
#pragma GCC unroll 8
      for (int b = 0; b < kR; ++b) {
        const __m512i hi = Pair(pk + b * 32 + 2 * r);
        acc[b][0] = Dp(acc[b][0], hi, t0);
        if (two_n) acc[b][1] = Dp(acc[b][1], hi, t1);
        if (kLo) {
          const __m512i lo = Pair(pk + p_lo + b * 32 + 2 * r);
          acc[b][0] = Dp(acc[b][0], lo, t0);
          if (two_n) acc[b][1] = Dp(acc[b][1], lo, t1);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int b = 0; b < kR; ++b) {
    _mm512_storeu_ps(y + (b0 + b) * 16, acc[b][0]);
    if (two_n) _mm512_storeu_ps(y + 16 * nb + (b0 + b) * 16, acc[b][1]);
  }
}

SIGNEDCUT_BF16 void Expand(const uint16_t* p, int64_t p_bt, const uint16_t* tx, int64_t tx_ct,
                           int64_t nkk, float* y, int64_t y_bt, int64_t nb, bool two_b,
                           bool two_n, bool lo, bool load, const Bf16Side* side) {
  for (int i = 0; i < (two_b ? 2 : 1); ++i) {
    const uint16_t* pi = p + i * p_bt;
    float* yi = y + i * y_bt;
    int64_t b = 0;
    if (lo) {
      for (; b + 8 <= nb; b += 8) ExpandRows<8, true>(pi, b, tx, tx_ct, nkk, yi, nb, two_n, load);
      for (; b < nb; ++b) ExpandRows<1, true>(pi, b, tx, tx_ct, nkk, yi, nb, two_n, load);
    } else {
      for (; b + 8 <= nb; b += 8) {
        ExpandRows<8, false>(pi, b, tx, tx_ct, nkk, yi, nb, two_n, load);
      }
      for (; b < nb; ++b) ExpandRows<1, false>(pi, b, tx, tx_ct, nkk, yi, nb, two_n, load);
    }
  }
  // No tile unit to overlap with: the side work runs after the products.
  if (side) {
    for (int64_t kk = 0; kk < nkk; ++kk) side->step(side->ctx, kk);
  }
}

}  // namespace

const Bf16Core& Avx512Bf16Core() {
  static const Bf16Core k = {"avx512_bf16", Begin, End, Project, Expand};
  return k;
}

}  // namespace signedcut
