// Times GreedyBatch (the sign search without XLA) on an N(0, 1) matrix: the
// marginal wall and process-CPU time per cut between W1 and W2 cuts (which
// leaves out the one-time copy and transpose of A; W2 - W1 = 64 holds two
// flushes).
//
// Build (from the repository root):
//   g++ -O3 -DNDEBUG -std=c++17 -w -Ixla_ffi benchmarks/drivers/greedy_bench.cc \
//     xla_ffi/greedy.cc xla_ffi/dispatch.cc xla_ffi/kernel_scalar.cc xla_ffi/kernel_avx512.cc \
//     xla_ffi/cpu_features.cc -lpthread -o /tmp/greedy_bench
// Run: /tmp/greedy_bench M N [W1 W2 THREADS]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <random>
#include <string>
#include <vector>

#include "kernel.h"

int main(int argc, char** argv) {
  using namespace signedcut;
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s M N [W1 W2 THREADS]\n", argv[0]);
    return 2;
  }
  const int64_t m = std::atoll(argv[1]), n = std::atoll(argv[2]);
  const int64_t w1 = argc > 3 ? std::atoll(argv[3]) : 32, w2 = argc > 4 ? std::atoll(argv[4]) : 96;
  const int threads = argc > 5 ? std::atoi(argv[5]) : 1;
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  std::vector<float> a(m * n);
  for (auto& v : a) v = nd(g);
  const int64_t nw = (n + 31) / 32, mw = (m + 31) / 32;
  std::vector<uint32_t> words(w2 * nw);
  for (auto& v : words) v = g();
  if (n % 32 != 0) {
    for (int64_t j = 0; j < w2; ++j) words[j * nw + nw - 1] &= (1u << (n % 32)) - 1u;
  }
  std::vector<uint32_t> sb(w2 * mw), tb(w2 * nw);
  std::vector<float> c(w2);
  int32_t cuts = 0;
  std::string err;
  const Kernels* k = SelectKernels(Impl::kAuto, &err);
  if (k == nullptr) {
    std::fprintf(stderr, "%s\n", err.c_str());
    return 1;
  }
  double wall[2], cpu[2];
  for (int i = 0; i < 2; ++i) {
    GreedyConfig cfg;
    cfg.m = m;
    cfg.n = n;
    cfg.w = i == 0 ? w1 : w2;
    cfg.num_threads = threads;
    cfg.share_matrix = threads > 1;
    const GreedyProblem pb{a.data(), words.data(), sb.data(), tb.data(), c.data(), &cuts};
    timespec c0, c1;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
    const auto t0 = std::chrono::steady_clock::now();
    const std::string e = GreedyBatch(*k, cfg, &pb, 1);
    wall[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
    cpu[i] = (c1.tv_sec - c0.tv_sec) + 1e-9 * (c1.tv_nsec - c0.tv_nsec);
    if (!e.empty()) {
      std::fprintf(stderr, "%s\n", e.c_str());
      return 1;
    }
  }
  std::printf("%s %lldx%lld threads=%d: wall %.2f ms, cpu %.2f ms per cut (marginal over %lld..%lld)\n",
              k->name, static_cast<long long>(m), static_cast<long long>(n), threads,
              (wall[1] - wall[0]) / (w2 - w1) * 1e3, (cpu[1] - cpu[0]) / (w2 - w1) * 1e3,
              static_cast<long long>(w1), static_cast<long long>(w2));
  return 0;
}
