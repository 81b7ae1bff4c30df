// The bf16 apply paths' data preparation and blocking (see apply_bf16.h):
// rounding x to bf16 in the Xv layout, expanding sign bits to ±1 bf16 tiles,
// splitting p into bf16 halves, and the loops over one partition of cuts that
// call a core's micro-kernels. Per-function AVX-512 target attributes; only
// reached where a bf16 core was chosen, which implies AVX-512.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "apply_bf16.h"
#include "apply_bf16_driver.h"

#define SIGNEDCUT_AVX512BW __attribute__((target("avx512f,avx512bw,avx512dq,bmi2")))

namespace signedcut {
namespace {

constexpr uint16_t kPlusOne = 0x3F80, kMinusOne = 0xBF80;  // bf16 ±1

// f32 → bf16, round to nearest even (NaNs stay NaN), 16 lanes to 16 u32
// holding the bf16 in their low half.
SIGNEDCUT_AVX512BW inline __m512i RoundBf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

SIGNEDCUT_AVX512BW inline __m512 Bf16ToF32(__m512i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

// 32 ±1 bf16 from 32 sign bits (bit set: −1).
SIGNEDCUT_AVX512BW inline void StoreSigns(uint16_t* dst, uint32_t bits) {
  _mm512_storeu_si512(dst, _mm512_mask_blend_epi16(_cvtu32_mask32(bits),
                                                   _mm512_set1_epi16(static_cast<short>(kPlusOne)),
                                                   _mm512_set1_epi16(static_cast<short>(kMinusOne))));
}

}  // namespace

Bf16Shape Bf16ShapeOf(int64_t rows, int64_t m, int64_t n) {
  Bf16Shape s;
  s.nb = std::min<int64_t>(16, rows);
  s.bt = (rows + s.nb - 1) / s.nb;
  s.rows_pad = s.bt * s.nb;
  s.kb = (m + 31) / 32;
  s.ldy = (n + 31) / 32 * 32;
  return s;
}

int64_t Bf16XvElems(const Bf16Shape& s) { return s.kb * s.bt * 16 * 2 * s.nb; }

SIGNEDCUT_AVX512BW void Bf16BuildXv(const float* x, int64_t rows, int64_t m, const Bf16Shape& s,
                                    uint16_t* xv) {
  std::memset(xv, 0, sizeof(uint16_t) * Bf16XvElems(s));
  uint32_t* xw = reinterpret_cast<uint32_t*>(xv);  // one u32 = one element pair
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t bt = r / s.nb, b = r % s.nb;
    const float* xr = x + r * m;
    for (int64_t kb = 0; kb < s.kb; ++kb) {
      const int64_t left = m - 32 * kb;
      const __mmask16 k0 = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1u);
      const __mmask16 k1 = left >= 32   ? 0xFFFF
                           : left <= 16 ? 0
                                        : static_cast<__mmask16>((1u << (left - 16)) - 1u);
      const __m512i h0 = RoundBf16(_mm512_maskz_loadu_ps(k0, xr + 32 * kb));
      const __m512i h1 = RoundBf16(_mm512_maskz_loadu_ps(k1, xr + 32 * kb + 16));
      // Dword q = elements (2q, 2q + 1): 16-bit word t of the result is the
      // low half of element t, word 2t of h0 (t < 16) or of h1.
      const __m512i pairs = _mm512_permutex2var_epi16(
          h0, _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32,
                               30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0),
          h1);
      // Pair q goes to row q of tile (kb, bt), column b.
      uint32_t* tile = xw + (kb * s.bt + bt) * 16 * s.nb;
      _mm512_i32scatter_epi32(tile + b, _mm512_mullo_epi32(lane, _mm512_set1_epi32(s.nb)), pairs,
                              4);
    }
  }
}

namespace {

// Sx tiles (cb, kb) for cuts [0, ncut) of `bits` (row stride mw words) and
// blocks [kb0, kb0 + nkb); rows of cuts ≥ ncut are +1 (their p is 0).
SIGNEDCUT_AVX512BW void ExpandS(const uint32_t* bits, int64_t mw, int64_t ncut, int64_t ncb,
                                int64_t kb0, int64_t nkb, uint16_t* sx) {
  for (int64_t cb = 0; cb < ncb; ++cb) {
    for (int64_t kb = 0; kb < nkb; ++kb) {
      uint16_t* dst = sx + (cb * nkb + kb) * 512;
      for (int64_t r = 0; r < 16; ++r) {
        const int64_t cut = cb * 16 + r;
        StoreSigns(dst + r * 32, cut < ncut ? bits[cut * mw + kb0 + kb] : 0u);
      }
    }
  }
}

// Tx tiles (ct, kk) for the column tiles ct0 and, if two, ct0 + 1 (ct0
// even: both lie in the same sign word), cut pairs [j0, j1) (even) of the
// nkk 32-cut blocks of cuts [0, ncut) of `bits` (row stride nw words);
// missing cuts are +1.
SIGNEDCUT_AVX512BW void ExpandT(const uint32_t* bits, int64_t nw, int64_t ncut, int64_t nkk,
                                int64_t ct0, bool two, uint16_t* tx, int64_t j0, int64_t j1) {
  const int64_t word = ct0 / 2;
  const __m512i plus = _mm512_set1_epi16(static_cast<short>(kPlusOne));
  const __m512i minus = _mm512_set1_epi16(static_cast<short>(kMinusOne));
  uint16_t* dst1 = tx + nkk * 512;
  for (int64_t j = j0; j < j1; j += 2) {
    const uint64_t a = j < ncut ? bits[j * nw + word] : 0u;
    const uint64_t b = j + 1 < ncut ? bits[(j + 1) * nw + word] : 0u;
    // Bit 2i + e of the low (high) half: sign of column i (16 + i) in cut j + e.
    const __mmask64 k = _pdep_u64(a, 0x5555555555555555ull) | _pdep_u64(b, 0xAAAAAAAAAAAAAAAAull);
    _mm512_storeu_si512(tx + j * 16, _mm512_mask_blend_epi16(static_cast<__mmask32>(k), plus, minus));
    if (two) {
      _mm512_storeu_si512(dst1 + j * 16,
                          _mm512_mask_blend_epi16(static_cast<__mmask32>(k >> 32), plus, minus));
    }
  }
}

// The expansion of one column-tile pair's Tx as side work (Bf16Side), one
// 32-cut block per slice.
struct ExpandTJob {
  const uint32_t* bits;
  int64_t nw, ncut, nkk, ct0;
  bool two;
  uint16_t* tx;
};

SIGNEDCUT_AVX512BW void ExpandTStep(const void* ctx, int64_t kk) {
  const auto& j = *static_cast<const ExpandTJob*>(ctx);
  ExpandT(j.bits, j.nw, j.ncut, j.nkk, j.ct0, j.two, j.tx, 32 * kk, 32 * kk + 32);
}

// P (tile-major, apply_bf16.h) for nkk 32-cut blocks from the f32 projection
// tiles of nbt batch tiles: p = c ∘ Ptmp; cuts past ncut are zero (their Tx
// rows are +1). The P_lo tiles only if `lo` (else they are never read).
SIGNEDCUT_AVX512BW void SplitP(const float* ptmp, const float* c, int64_t ncut, int64_t ncb,
                               int64_t nkk, const Bf16Shape& s, int64_t nbt, bool lo,
                               uint16_t* p) {
  const __m512i cuts = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(static_cast<int>(s.nb)));
  const int64_t tile = 32 * s.nb;  // elements per P tile
  for (int64_t cb = 0; cb < 2 * nkk; ++cb) {
    if (cb >= ncb) {  // the second half of the last 32-cut block, past ncut
      for (int64_t bt = 0; bt < nbt; ++bt) {
        uint16_t* at = p + ((bt * nkk + cb / 2) * 2) * tile + 16;
        for (int64_t b = 0; b < s.nb; ++b) {
          std::memset(at + b * 32, 0, 32);
          if (lo) std::memset(at + tile + b * 32, 0, 32);
        }
      }
      continue;
    }
    const int64_t left = ncut - cb * 16;
    const __mmask16 valid = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1u);
    const __m512 cv = _mm512_maskz_loadu_ps(valid, c + cb * 16);
    for (int64_t bt = 0; bt < nbt; ++bt) {
      const float* src = ptmp + (cb * nbt + bt) * 16 * s.nb;
      uint16_t* at = p + ((bt * nkk + cb / 2) * 2) * tile + (cb % 2) * 16;
      for (int64_t b = 0; b < s.nb; ++b) {
        const __m512 v = _mm512_mul_ps(cv, _mm512_i32gather_ps(cuts, src + b, 4));
        const __m512i hi = RoundBf16(v);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(at + b * 32), _mm512_cvtepi32_epi16(hi));
        if (lo) {
          const __m512i rest = RoundBf16(_mm512_sub_ps(v, Bf16ToF32(hi)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(at + tile + b * 32),
                              _mm512_cvtepi32_epi16(rest));
        }
      }
    }
  }
}

}  // namespace

Bf16Scratch::Bf16Scratch(const Bf16Shape& s, int64_t nbt)
    : sx(static_cast<size_t>(2 * kBf16BlockKb * 512)),
      ptmp(static_cast<size_t>(kBf16ChunkCuts / 16 * nbt * 16 * s.nb)),
      p(static_cast<size_t>(2 * nbt * s.nb * kBf16ChunkCuts)),
      tx(static_cast<size_t>(2 * 2 * kBf16ChunkCuts / 32 * 512)) {}

SIGNEDCUT_AVX512BW void Bf16Partition(const Bf16Core& core, const ApplyArgs& a,
                                      const Bf16Shape& s, const uint16_t* xv, int64_t j0,
                                      int64_t j1, int64_t bt0, int64_t bt1, float* y,
                                      Bf16Scratch& sc, bool lo) {
  const int64_t mw = (a.m + 31) / 32, nw = (a.n + 31) / 32;
  const int64_t nbt = bt1 - bt0;  // the scratch holds these batch tiles, from 0
  for (int64_t k0 = j0; k0 < j1; k0 += kBf16ChunkCuts) {
    const int64_t ncut = std::min(j1, k0 + kBf16ChunkCuts) - k0;
    const int64_t ncb = (ncut + 15) / 16, nkk = (ncut + 31) / 32;
    // Project: Ptmp(cb, bt) = Σ_kb Sx(cb, kb) · Xv(kb, bt). The signs of two
    // cut blocks are expanded for kBf16BlockKb blocks of m at a time (32 KiB,
    // stays in L1) and used at once by every batch tile.
    core.begin(1, s.nb);
    for (int64_t kb0 = 0; kb0 < s.kb; kb0 += kBf16BlockKb) {
      const int64_t nkb = std::min(kBf16BlockKb, s.kb - kb0);
      for (int64_t cb = 0; cb < ncb; cb += 2) {
        const bool two_c = cb + 1 < ncb;
        ExpandS(a.s_bits + (k0 + 16 * cb) * mw, mw, ncut - 16 * cb, two_c ? 2 : 1, kb0, nkb,
                sc.sx.data());
        for (int64_t bt = bt0; bt < bt1; bt += 2) {
          core.project(sc.sx.data(), nkb * 512, xv + (kb0 * s.bt + bt) * 32 * s.nb,
                       s.bt * 32 * s.nb, nkb, sc.ptmp.data() + (cb * nbt + bt - bt0) * 16 * s.nb,
                       nbt * 16 * s.nb, 16 * s.nb, s.nb, two_c, bt + 1 < bt1, kb0 > 0);
        }
      }
    }
    SplitP(sc.ptmp.data(), a.c + k0, ncut, ncb, nkk, s, nbt, lo, sc.p.data());
    // Expand: Y(bt, ct) += (P_hi [+ P_lo])(bt, ·) · Tx(ct, ·), two column tiles
    // of expanded signs at a time (32 KiB for 512 cuts: L1).
    // With more than one batch tile the signs of the next pair are expanded
    // into the other half of sc.tx by the first micro-kernel call of the
    // current pair (Bf16Side). With one (≤ 16 rows) that call's products are
    // too short to hide the expansion, and the second buffer only costs L1:
    // the signs are expanded in place before the call (measured at 8 rows,
    // one thread: 15.6 vs 18.3 ms).
    core.begin(2, s.nb);
    const bool overlap = nbt > 1;
    const int64_t nct = s.ldy / 16, tx_half = overlap ? 2 * nkk * 512 : 0;
    if (overlap) ExpandT(a.t_bits + k0 * nw, nw, ncut, nkk, 0, nct > 1, sc.tx.data(), 0, nkk * 32);
    for (int64_t ct = 0; ct < nct; ct += 2) {
      const bool two_n = ct + 1 < nct;
      const uint16_t* tx = sc.tx.data() + (ct / 2 % 2) * tx_half;
      const ExpandTJob next{a.t_bits + k0 * nw, nw, ncut, nkk, ct + 2, ct + 3 < nct,
                            sc.tx.data() + (ct / 2 % 2 == 0 ? tx_half : 0)};
      const Bf16Side side{ExpandTStep, &next};
      if (!overlap) ExpandT(a.t_bits + k0 * nw, nw, ncut, nkk, ct, two_n, sc.tx.data(), 0, nkk * 32);
      for (int64_t bt = bt0; bt < bt1; bt += 2) {
        core.expand(sc.p.data() + (bt - bt0) * nkk * 64 * s.nb, nkk * 64 * s.nb, tx, nkk * 512,
                    nkk, y + (bt * nct + ct) * 16 * s.nb, nct * 16 * s.nb, s.nb, bt + 1 < bt1,
                    two_n, lo, /*load=*/k0 > j0,
                    overlap && bt == bt0 && ct + 2 < nct ? &side : nullptr);
      }
    }
  }
  core.end();
}

SIGNEDCUT_AVX512BW void Bf16StoreRows(const float* ybuf, int64_t parts, int64_t stride,
                                      const Bf16Shape& s, int64_t r0, int64_t r1, int64_t n,
                                      float* y) {
  const int64_t nct = s.ldy / 16;
  const int64_t full = n / 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n % 16)) - 1u);
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = ybuf + (r / s.nb) * nct * 16 * s.nb + (r % s.nb) * 16;
    float* yr = y + r * n;
    for (int64_t ct = 0; ct * 16 < n; ++ct) {
      const float* at = row + ct * 16 * s.nb;
      __m512 v = _mm512_loadu_ps(at);
      for (int64_t k = 1; k < parts; ++k) v = _mm512_add_ps(v, _mm512_loadu_ps(at + k * stride));
      if (ct < full) {
        _mm512_storeu_ps(yr + ct * 16, v);
      } else {
        _mm512_mask_storeu_ps(yr + ct * 16, tail, v);
      }
    }
  }
}

}  // namespace signedcut
