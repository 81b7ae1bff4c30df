// Chooses the greedy's kernel table once, at first use, by the policy of
// cpu_features.h: the JAX_SIGNEDCUT_KERNEL environment variable ("scalar" or
// "avx512") if set, else the best implementation the CPU supports. A per-call
// `impl` attribute (see ffi.cc) lets tests run every implementation in one
// process. ResolveThreads does the same for the thread count
// (JAX_SIGNEDCUT_THREADS).
#include <cstdlib>
#include <string>

#include "cpu_features.h"
#include "kernel.h"

namespace signedcut {
namespace {

struct Choice {
  const Kernels* kernels = nullptr;
  std::string error;
};

Choice Resolve(Impl impl) {
  Choice c;
  switch (impl) {
    case Impl::kScalar:
      c.kernels = &ScalarKernels();
      break;
    case Impl::kAvx512:
      if (Avx512Supported()) {
        c.kernels = &Avx512Kernels();
      } else {
        c.error = "the avx512 kernel was requested but this CPU lacks AVX-512 "
                  "(F, BW, VL, DQ, VPOPCNTDQ); use the scalar kernel";
      }
      break;
    default:
      c.error = "unknown kernel implementation " + std::to_string(static_cast<int>(impl));
  }
  return c;
}

Choice ResolveAuto() {
  const std::string& want = EnvChoice("JAX_SIGNEDCUT_KERNEL");
  if (want.empty() || want == "auto") {
    return Resolve(Avx512Supported() ? Impl::kAvx512 : Impl::kScalar);
  }
  if (want == "scalar") return Resolve(Impl::kScalar);
  if (want == "avx512") return Resolve(Impl::kAvx512);
  Choice c;
  c.error = "JAX_SIGNEDCUT_KERNEL must be 'scalar', 'avx512' or 'auto', got '" + want + "'";
  return c;
}

}  // namespace

bool Avx512Supported() { return Cpu().avx512; }

void ResolveThreads(int64_t requested, GreedyConfig* cfg) {
  static const int64_t from_env = [] {
    const std::string& s = EnvChoice("JAX_SIGNEDCUT_THREADS");
    if (s.empty()) return int64_t{0};
    const char* env = s.c_str();
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    return (end != env && *end == '\0' && v > 0) ? static_cast<int64_t>(v) : int64_t{0};
  }();
  const int64_t n = requested > 0 ? requested : from_env;
  cfg->num_threads = n;  // 0: hardware concurrency
  cfg->share_matrix = n > 0;
}

const Kernels* SelectKernels(Impl impl, std::string* error) {
  if (impl == Impl::kAuto) {
    static const Choice chosen = ResolveAuto();  // once, thread-safe
    if (chosen.kernels == nullptr) *error = chosen.error;
    return chosen.kernels;
  }
  const Choice c = Resolve(impl);
  if (c.kernels == nullptr) *error = c.error;
  return c.kernels;
}

}  // namespace signedcut
