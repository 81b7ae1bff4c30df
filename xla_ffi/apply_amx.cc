// AMX (TDPBF16PS) micro-kernels of the bf16 apply paths (see apply_bf16.h):
// 2×2 blocks of 16×16 f32 accumulator tiles, bf16 in, f32 accumulate. Every
// function carries its own target attribute; AmxUsable() (cpu_features.h)
// must have granted the tile state before any of them runs.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "apply_bf16.h"

#define SIGNEDCUT_AMX __attribute__((target("amx-tile,amx-bf16")))

namespace signedcut {
namespace {

// The LDTILECFG memory operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

// Tiles 0-3: the 2×2 accumulators; 4, 5: the A operands; 6, 7: the B operands.
SIGNEDCUT_AMX void Begin(int phase, int64_t nb) {
  TileConfig cfg;
  const auto nbb = static_cast<uint16_t>(4 * nb);
  for (int t = 0; t < 8; ++t) {
    if (phase == 1) {  // C: 16 cuts × nb rows; A: 16 cuts × 32 bf16; B: 16 pairs × nb
      cfg.rows[t] = 16;
      cfg.colsb[t] = (t == 4 || t == 5) ? 64 : nbb;
    } else {  // C: nb rows × 16 f32; A: nb rows × 32 bf16; B: 16 pairs × 16
      cfg.rows[t] = (t < 6) ? static_cast<uint8_t>(nb) : 16;
      cfg.colsb[t] = 64;
    }
  }
  // Not _tile_loadconfig: GCC 12 does not tell the optimiser that it reads
  // the whole struct, and dropped the stores to colsb / rows as dead.
  asm volatile("ldtilecfg %0" : : "m"(cfg));
}

SIGNEDCUT_AMX void End() { _tile_release(); }

template <bool kTwoC, bool kTwoB>
SIGNEDCUT_AMX void ProjectT(const uint16_t* sx, int64_t sx_cb, const uint16_t* xv, int64_t xv_kb,
                            int64_t nkb, float* c, int64_t c_cb, int64_t c_bt, int64_t nb,
                            bool load) {
  const int64_t cs = 4 * nb;  // C and B row stride, bytes
  float* c1 = c + c_bt;
  float* c2 = c + c_cb;
  float* c3 = c + c_cb + c_bt;
  if (load) {
    _tile_loadd(0, c, cs);
    if (kTwoB) _tile_loadd(1, c1, cs);
    if (kTwoC) _tile_loadd(2, c2, cs);
    if (kTwoC && kTwoB) _tile_loadd(3, c3, cs);
  } else {
    _tile_zero(0);
    if (kTwoB) _tile_zero(1);
    if (kTwoC) _tile_zero(2);
    if (kTwoC && kTwoB) _tile_zero(3);
  }
  const int64_t xv_bt = 32 * nb;  // elements to the next batch tile
  for (int64_t kb = 0; kb < nkb; ++kb) {
    _tile_loadd(4, sx + kb * 512, 64);
    _tile_loadd(6, xv + kb * xv_kb, cs);
    _tile_dpbf16ps(0, 4, 6);
    if (kTwoB) {
      _tile_loadd(7, xv + kb * xv_kb + xv_bt, cs);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (kTwoC) {
      _tile_loadd(5, sx + sx_cb + kb * 512, 64);
      _tile_dpbf16ps(2, 5, 6);
      if (kTwoB) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, cs);
  if (kTwoB) _tile_stored(1, c1, cs);
  if (kTwoC) _tile_stored(2, c2, cs);
  if (kTwoC && kTwoB) _tile_stored(3, c3, cs);
}

SIGNEDCUT_AMX void Project(const uint16_t* sx, int64_t sx_cb, const uint16_t* xv, int64_t xv_kb,
                           int64_t nkb, float* c, int64_t c_cb, int64_t c_bt, int64_t nb,
                           bool two_c, bool two_b, bool load) {
  if (two_c && two_b) {
    ProjectT<true, true>(sx, sx_cb, xv, xv_kb, nkb, c, c_cb, c_bt, nb, load);
  } else if (two_c) {
    ProjectT<true, false>(sx, sx_cb, xv, xv_kb, nkb, c, c_cb, c_bt, nb, load);
  } else if (two_b) {
    ProjectT<false, true>(sx, sx_cb, xv, xv_kb, nkb, c, c_cb, c_bt, nb, load);
  } else {
    ProjectT<false, false>(sx, sx_cb, xv, xv_kb, nkb, c, c_cb, c_bt, nb, load);
  }
}

template <bool kTwoB, bool kTwoN, bool kLo>
SIGNEDCUT_AMX void ExpandT(const uint16_t* p, int64_t p_bt, const uint16_t* tx, int64_t tx_ct,
                           int64_t nkk, float* y, int64_t y_bt, int64_t nb, bool load,
                           const Bf16Side* side) {
  float* y1 = y + y_bt;     // next batch tile
  float* y2 = y + 16 * nb;  // next column tile
  float* y3 = y1 + 16 * nb;
  const int64_t p_kk = 64 * nb, p_lo = 32 * nb;  // elements
  if (load) {
    _tile_loadd(0, y, 64);
    if (kTwoB) _tile_loadd(1, y1, 64);
    if (kTwoN) _tile_loadd(2, y2, 64);
    if (kTwoB && kTwoN) _tile_loadd(3, y3, 64);
  } else {
    _tile_zero(0);
    if (kTwoB) _tile_zero(1);
    if (kTwoN) _tile_zero(2);
    if (kTwoB && kTwoN) _tile_zero(3);
  }
  for (int64_t kk = 0; kk < nkk; ++kk) {
    _tile_loadd(6, tx + kk * 512, 64);
    if (kTwoN) _tile_loadd(7, tx + tx_ct + kk * 512, 64);
    for (int half = 0; half < (kLo ? 2 : 1); ++half) {
      const uint16_t* a = p + kk * p_kk + half * p_lo;
      _tile_loadd(4, a, 64);
      _tile_dpbf16ps(0, 4, 6);
      if (kTwoN) _tile_dpbf16ps(2, 4, 7);
      if (kTwoB) {
        _tile_loadd(5, a + p_bt, 64);
        _tile_dpbf16ps(1, 5, 6);
        if (kTwoN) _tile_dpbf16ps(3, 5, 7);
      }
    }
    if (side) side->step(side->ctx, kk);
  }
  _tile_stored(0, y, 64);
  if (kTwoB) _tile_stored(1, y1, 64);
  if (kTwoN) _tile_stored(2, y2, 64);
  if (kTwoB && kTwoN) _tile_stored(3, y3, 64);
}

template <bool kLo>
SIGNEDCUT_AMX void ExpandLo(const uint16_t* p, int64_t p_bt, const uint16_t* tx, int64_t tx_ct,
                            int64_t nkk, float* y, int64_t y_bt, int64_t nb, bool two_b,
                            bool two_n, bool load, const Bf16Side* side) {
  if (two_b && two_n) {
    ExpandT<true, true, kLo>(p, p_bt, tx, tx_ct, nkk, y, y_bt, nb, load, side);
  } else if (two_b) {
    ExpandT<true, false, kLo>(p, p_bt, tx, tx_ct, nkk, y, y_bt, nb, load, side);
  } else if (two_n) {
    ExpandT<false, true, kLo>(p, p_bt, tx, tx_ct, nkk, y, y_bt, nb, load, side);
  } else {
    ExpandT<false, false, kLo>(p, p_bt, tx, tx_ct, nkk, y, y_bt, nb, load, side);
  }
}

SIGNEDCUT_AMX void Expand(const uint16_t* p, int64_t p_bt, const uint16_t* tx, int64_t tx_ct,
                          int64_t nkk, float* y, int64_t y_bt, int64_t nb, bool two_b,
                          bool two_n, bool lo, bool load, const Bf16Side* side) {
  if (lo) {
    ExpandLo<true>(p, p_bt, tx, tx_ct, nkk, y, y_bt, nb, two_b, two_n, load, side);
  } else {
    ExpandLo<false>(p, p_bt, tx, tx_ct, nkk, y, y_bt, nb, two_b, two_n, load, side);
  }
}

}  // namespace

const Bf16Core& AmxCore() {
  static const Bf16Core k = {"amx", Begin, End, Project, Expand};
  return k;
}

}  // namespace signedcut
