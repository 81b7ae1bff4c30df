// What this machine's AMX unit gives: cycles per TDPBF16PS (16×16×32 bf16 → f32) in the
// apply kernel's 2×2 block of accumulators, with no tile loads at all and with the four operand
// tiles loaded every step from buffers of 8 KiB (L1) up to 8 MiB (beyond L2) per operand. The
// apply micro-kernels (apply_amx.cc) are judged against these figures, not against the
// datasheet's 16 cycles. Cycles assume 2.1 GHz (the VM's nominal clock); each figure is the
// best of 5 runs (the host is shared).
//
// Build and run (Linux, a CPU with AMX):
//   g++ -O2 -std=c++17 benchmarks/drivers/amx_probe.cc -o /tmp/amx_probe && /tmp/amx_probe
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

constexpr int kArchReqXcompPerm = 0x1023, kXfeatureTileData = 18;
constexpr int64_t kIters = 2000000;
constexpr uint16_t kOne = 0x3F80;  // bf16 1.0

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile,amx-bf16"))) void Configure() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  asm volatile("ldtilecfg %0" : : "m"(c));
}

__attribute__((target("amx-tile"))) void Release() { _tile_release(); }

// Cycles per product of kIters steps of the 2×2 block (tiles 0-3 accumulate, 4/5 the A
// operands, 6/7 the B operands), the operands read from `tiles` 1 KiB tiles of a and b if
// `loads`, else kept in their registers.
__attribute__((target("amx-tile,amx-bf16"))) double Cycles(const uint16_t* a, const uint16_t* b,
                                                            int64_t tiles, bool loads,
                                                            float* out) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a + 512, 64);
  _tile_loadd(6, b, 64);
  _tile_loadd(7, b + 512, 64);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < kIters; ++i) {
    const int64_t k = (i * 2) % tiles;
    if (loads) {
      _tile_loadd(4, a + k * 512, 64);
      _tile_loadd(6, b + k * 512, 64);
    }
    _tile_dpbf16ps(0, 4, 6);
    if (loads) _tile_loadd(7, b + (k + 1) * 512, 64);
    _tile_dpbf16ps(1, 4, 7);
    if (loads) _tile_loadd(5, a + (k + 1) * 512, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  _tile_stored(1, out + 256, 64);
  _tile_stored(2, out + 512, 64);
  _tile_stored(3, out + 768, 64);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return s / (4.0 * kIters) * 2.1e9;
}

double Best(const uint16_t* a, const uint16_t* b, int64_t tiles, bool loads, float* out) {
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) best = std::min(best, Cycles(a, b, tiles, loads, out));
  return best;
}

}  // namespace

int main() {
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureTileData) != 0) {
    std::puts("the kernel refused AMX tile state (arch_prctl)");
    return 1;
  }
  Configure();
  std::vector<float> out(1024);
  std::vector<uint16_t> one(1024, kOne), other(1024, kOne);
  std::printf("no tile loads: %.1f cycles per product\n",
              Best(one.data(), other.data(), 1, false, out.data()));
  for (int64_t kib : {8, 32, 256, 1024, 8192}) {  // per operand; one tile is 1 KiB
    std::vector<uint16_t> a((kib + 2) * 512, kOne), b((kib + 2) * 512, kOne);
    std::printf("operands loaded from %5ld KiB each: %.1f cycles per product\n",
                static_cast<long>(kib), Best(a.data(), b.data(), kib, true, out.data()));
  }
  Release();
  return 0;
}
