// Times ApplySignedCut (the packed-apply kernel without XLA) on random
// factors: wall and process-CPU medians over repeats. On a shared machine the
// CPU time is the steadier figure (wall time includes the time the process
// was not scheduled); interleave two builds to compare them.
//
// Build (from the repository root, with the venv active):
//   g++ -O3 -DNDEBUG -std=c++17 -w -I$(python -c "import jax.ffi; print(jax.ffi.include_dir())") \
//     -Ixla_ffi benchmarks/drivers/apply_bench.cc xla_ffi/cpu_features.cc xla_ffi/apply_*.cc \
//     -lpthread -o /tmp/apply_bench
// Run: /tmp/apply_bench ROWS M N W CORE THREADS [REPEATS [PRECISION]]
//   CORE: 0 auto, 1 scalar, 2 avx512, 3 avx512_bf16, 4 amx.
//   PRECISION: 0 default, 1 highest, 2 bf16_bf16_f32 (ApplyPrecision).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <random>
#include <string>
#include <vector>

#include "apply_kernel.h"

namespace {
double CpuSeconds() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}
double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  using namespace signedcut;
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s ROWS M N W CORE THREADS [REPEATS [PRECISION]]\n", argv[0]);
    return 2;
  }
  const int64_t rows = std::atoll(argv[1]), m = std::atoll(argv[2]), n = std::atoll(argv[3]),
                w = std::atoll(argv[4]);
  const int threads = std::atoi(argv[6]), reps = argc > 7 ? std::atoi(argv[7]) : 5;
  const auto precision = static_cast<ApplyPrecision>(argc > 8 ? std::atoi(argv[8]) : 0);
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  std::vector<float> x(rows * m), c(w), y(rows * n);
  std::vector<uint32_t> sb(w * ((m + 31) / 32)), tb(w * ((n + 31) / 32));
  for (auto& v : x) v = nd(g);
  for (auto& v : c) v = nd(g);
  for (auto& v : sb) v = g();
  for (auto& v : tb) v = g();
  std::string err;
  const ApplyCore core = ResolveApplyCore(static_cast<ApplyCore>(std::atoi(argv[5])),
                                          precision == ApplyPrecision::kHighest, rows,
                                          rows * w * (m + n), &err);
  if (core == ApplyCore::kAuto) {
    std::fprintf(stderr, "%s\n", err.c_str());
    return 1;
  }
  std::vector<double> wall, cpu;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    const double c0 = CpuSeconds();
    if (!ApplySignedCut(x.data(), sb.data(), tb.data(), c.data(), y.data(), rows, m, n, w, core,
                        threads, {}, precision)) {
      std::fprintf(stderr, "allocation failed\n");
      return 1;
    }
    cpu.push_back(CpuSeconds() - c0);
    wall.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  double sum = 0;
  for (const float v : y) sum += v;
  std::printf("%s rows=%lld m=%lld n=%lld w=%lld threads=%d wall median %.2f ms, cpu median %.2f "
              "min %.2f ms (checksum %.6g)\n",
              ApplyCoreName(core), static_cast<long long>(rows), static_cast<long long>(m),
              static_cast<long long>(n), static_cast<long long>(w), threads,
              Median(wall) * 1e3, Median(cpu) * 1e3, *std::min_element(cpu.begin(), cpu.end()) * 1e3,
              sum);
  return 0;
}
