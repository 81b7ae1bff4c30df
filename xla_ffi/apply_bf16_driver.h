// The blocking of the bf16 apply paths over one partition of cuts
// (apply_bf16_layout.cc), shared by the threaded driver in apply_ffi.cc.
#ifndef JAX_SIGNEDCUT_XLA_FFI_APPLY_BF16_DRIVER_H_
#define JAX_SIGNEDCUT_XLA_FFI_APPLY_BF16_DRIVER_H_

#include <cstdint>
#include <vector>

#include "apply_bf16.h"
#include "apply_kernel.h"

namespace signedcut {

// Cuts per chunk: the projection of a chunk (its P_hi / P_lo) is finished
// before its expansion starts, and its expanded signs for two column tiles
// (32 KiB) stay in L1.
inline constexpr int64_t kBf16ChunkCuts = 512;
// 32-element blocks of m per projection pass: the expanded signs of two cut
// blocks for them (32 KiB) stay in L1.
inline constexpr int64_t kBf16BlockKb = 16;

struct Bf16Shape {
  int64_t nb = 0;        // batch rows per tile, min(16, rows)
  int64_t bt = 0;        // batch tiles
  int64_t rows_pad = 0;  // bt · nb
  int64_t kb = 0;        // 32-element blocks of m
  int64_t ldy = 0;       // row stride of the partition outputs, n rounded up to 32
};

Bf16Shape Bf16ShapeOf(int64_t rows, int64_t m, int64_t n);
int64_t Bf16XvElems(const Bf16Shape& s);
// x (rows, m) f32 rounded to bf16 in the Xv layout of apply_bf16.h.
void Bf16BuildXv(const float* x, int64_t rows, int64_t m, const Bf16Shape& s, uint16_t* xv);

// Per-partition scratch for nbt batch tiles (allocated by the caller, before
// any worker starts).
struct Bf16Scratch {
  Bf16Scratch(const Bf16Shape& s, int64_t nbt);
  std::vector<uint16_t> sx;
  std::vector<float> ptmp;
  std::vector<uint16_t> p, tx;
};

// The batch tiles [bt0, bt1) of y (rows_pad × ldy in the tile-major Y layout
// of apply_bf16.h; need not be initialised) = the product of cuts [j0, j1);
// p in two bf16 halves if `lo`, else in one (the single-pass mode). Every
// element of those tiles is written, each a sum over the cuts in the same
// order whatever the other partitions do.
void Bf16Partition(const Bf16Core& core, const ApplyArgs& a, const Bf16Shape& s,
                   const uint16_t* xv, int64_t j0, int64_t j1, int64_t bt0, int64_t bt1,
                   float* y, Bf16Scratch& sc, bool lo);

// Rows [r0, r1) of the row-major output y (rows × n) = the sum, in order k =
// 0, 1, …, of `parts` tile-major buffers `stride` floats apart.
void Bf16StoreRows(const float* ybuf, int64_t parts, int64_t stride, const Bf16Shape& s,
                   int64_t r0, int64_t r1, int64_t n, float* y);

}  // namespace signedcut

#endif  // JAX_SIGNEDCUT_XLA_FFI_APPLY_BF16_DRIVER_H_
