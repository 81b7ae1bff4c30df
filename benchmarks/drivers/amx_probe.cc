// What this machine's AMX unit gives: cycles per TDPBF16PS (16×16×32 bf16 → f32) in the
// apply kernel's 2×2 block of accumulators, with no tile loads at all and with the four operand
// tiles loaded every step from buffers of 8 KiB (L1) up to 8 MiB (beyond L2) per operand. The
// apply micro-kernels (apply_amx.cc) are judged against these figures, not against the
// datasheet's 16 cycles. Cycles assume 2.1 GHz (the VM's nominal clock).
//
// Build and run (Linux, a CPU with AMX):
//   g++ -O2 -std=c++17 benchmarks/drivers/amx_probe.cc -o /tmp/amx_probe && /tmp/amx_probe
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
struct alignas(64) Cfg { uint8_t palette = 1, start = 0, r[14] = {}; uint16_t colsb[16] = {}; uint8_t rows[16] = {}; };
__attribute__((target("amx-tile,amx-bf16"))) void Config() {
  Cfg c; for (int t = 0; t < 8; ++t) { c.rows[t] = 16; c.colsb[t] = 64; }
  asm volatile("ldtilecfg %0" : : "m"(c));
}
__attribute__((target("amx-tile,amx-bf16"))) double Run(const uint16_t* a, const uint16_t* b, int64_t tiles, int64_t iters, bool loads, float* out) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, a, 64); _tile_loadd(5, a + 512, 64); _tile_loadd(6, b, 64); _tile_loadd(7, b + 512, 64);
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    const int64_t k = (i * 2) % tiles;
    if (loads) { _tile_loadd(4, a + k * 512, 64); _tile_loadd(6, b + k * 512, 64); }
    _tile_dpbf16ps(0, 4, 6);
    if (loads) _tile_loadd(7, b + (k + 1) * 512, 64);
    _tile_dpbf16ps(1, 4, 7);
    if (loads) _tile_loadd(5, a + (k + 1) * 512, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64); _tile_stored(1, out + 256, 64); _tile_stored(2, out + 512, 64); _tile_stored(3, out + 768, 64);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return s / (4.0 * iters) * 2.1e9;  // cycles per product at 2.1 GHz
}
__attribute__((target("amx-tile"))) void Release() { _tile_release(); }
int main() {
  if (syscall(SYS_arch_prctl, 0x1023, 18)) { std::puts("no AMX permission"); return 1; }
  Config();
  std::vector<float> out(1024);
  for (int64_t kib : {8, 32, 256, 1024, 8192}) {   // per operand
    const int64_t tiles = kib;                        // 1 KiB per tile
    std::vector<uint16_t> a((tiles + 2) * 512, 0x3F80), b((tiles + 2) * 512, 0x3F80);
    for (int rep = 0; rep < 2; ++rep) {
      double c = Run(a.data(), b.data(), tiles, 2000000, true, out.data());
      std::printf("operands %5ld KiB each: %.1f cycles per product (with loads)\n", (long)kib, c);
    }
  }
  std::vector<uint16_t> a(1024, 0x3F80), b(1024, 0x3F80);
  std::printf("no loads: %.1f cycles per product\n", Run(a.data(), b.data(), 1, 2000000, false, out.data()));
  Release();
}
