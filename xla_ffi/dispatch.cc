// Chooses the kernel table once, at first use (simdjson-style): the
// JAX_SIGNEDCUT_KERNEL environment variable ("scalar" or "avx512") if set,
// else the best implementation the CPU supports. A per-call `impl` attribute
// (see ffi.cc) lets tests run every implementation in one process.
#include <cstdlib>
#include <string>

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
  const char* env = std::getenv("JAX_SIGNEDCUT_KERNEL");
  const std::string want = env == nullptr ? "" : env;
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
