// XLA FFI binding of the greedy decomposition (the handler layer): checks
// buffers, maps the batch (with size-1 broadcasting for vmap's
// "expand_dims"), and calls GreedyBatch. Never throws, aborts or prints:
// every failure comes back as an ffi::Error.
#include <cstdint>
#include <new>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "ffi_util.h"
#include "kernel.h"

namespace ffi = xla::ffi;

namespace signedcut {
namespace {

ffi::Error GreedyImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::U32> words,
                      ffi::ResultBuffer<ffi::U32> s_bits, ffi::ResultBuffer<ffi::U32> t_bits,
                      ffi::ResultBuffer<ffi::F32> c, ffi::ResultBuffer<ffi::S32> num_cuts,
                      double max_error, int32_t impl, int32_t num_threads) {
  const auto ad = a.dimensions();
  const auto wd = words.dimensions();
  const auto od = c->dimensions();
  if (ad.size() < 2) {
    return ffi::Error::InvalidArgument("a must have rank >= 2, got shape " + DimsToString(ad));
  }
  const size_t nb = ad.size() - 2;
  const int64_t m = ad[nb], n = ad[nb + 1];
  const int64_t mw = (m + 31) / 32, nw = (n + 31) / 32;
  if (m < 1 || n < 1) {
    return ffi::Error::InvalidArgument("a must not be empty, got shape " + DimsToString(ad));
  }
  if (wd.size() != nb + 2 || wd[nb + 1] != nw) {
    return ffi::Error::InvalidArgument(
        "words must have shape (batch..., w, " + std::to_string(nw) + ") with the rank of a " +
        DimsToString(ad) + ", got " + DimsToString(wd));
  }
  const int64_t w = wd[nb];
  if (od.size() != nb + 1 || od[nb] != w) {
    return ffi::Error::InvalidArgument("c must have shape (batch..., " + std::to_string(w) +
                                       "), got " + DimsToString(od));
  }
  const auto sd = s_bits->dimensions(), td = t_bits->dimensions(), nd = num_cuts->dimensions();
  if (sd.size() != nb + 2 || td.size() != nb + 2 || nd.size() != nb || sd[nb] != w ||
      sd[nb + 1] != mw || td[nb] != w || td[nb + 1] != nw) {
    return ffi::Error::InvalidArgument("inconsistent result shapes s_bits " + DimsToString(sd) +
                                       ", t_bits " + DimsToString(td) + ", num_cuts " +
                                       DimsToString(nd));
  }
  // Row-major strides (in matrices) of each operand's batch dims; size-1
  // dims broadcast (stride 0).
  int64_t count = 1;
  std::vector<int64_t> out_dims(nb), a_stride(nb), w_stride(nb);
  try {
    int64_t as = 1, ws = 1;
    for (size_t i = nb; i-- > 0;) {
      const int64_t o = od[i];
      if (sd[i] != o || td[i] != o || nd[i] != o || (ad[i] != o && ad[i] != 1) ||
          (wd[i] != o && wd[i] != 1)) {
        return ffi::Error::InvalidArgument(
            "batch dims do not broadcast: a " + DimsToString(ad) + ", words " + DimsToString(wd) +
            ", c " + DimsToString(od));
      }
      out_dims[i] = o;
      a_stride[i] = ad[i] == 1 ? 0 : as;
      w_stride[i] = wd[i] == 1 ? 0 : ws;
      as *= ad[i];
      ws *= wd[i];
      count *= o;
    }
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "out of memory");
  }

  std::string error;
  const Kernels* k = SelectKernels(static_cast<Impl>(impl), &error);
  if (k == nullptr) return ffi::Error::InvalidArgument(error);

  GreedyConfig cfg;
  cfg.m = m;
  cfg.n = n;
  cfg.w = w;
  cfg.max_error = max_error;
  ResolveThreads(num_threads, &cfg);
  try {
    std::vector<GreedyProblem> problems(count);
    std::vector<int64_t> idx(nb, 0);
    for (int64_t b = 0; b < count; ++b) {
      int64_t ai = 0, wi = 0;
      for (size_t i = 0; i < nb; ++i) {
        ai += idx[i] * a_stride[i];
        wi += idx[i] * w_stride[i];
      }
      problems[b] = GreedyProblem{a.typed_data() + ai * m * n, words.typed_data() + wi * w * nw,
                                  s_bits->typed_data() + b * w * mw,
                                  t_bits->typed_data() + b * w * nw, c->typed_data() + b * w,
                                  num_cuts->typed_data() + b};
      for (size_t i = nb; i-- > 0;) {  // row-major increment of the batch index
        if (++idx[i] < out_dims[i]) break;
        idx[i] = 0;
      }
    }
    error = GreedyBatch(*k, cfg, problems.data(), count);
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, e.what());
  }
  if (!error.empty()) return ffi::Error(ffi::ErrorCode::kResourceExhausted, error);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace signedcut

// The greedy signed cut decomposition of a batch of matrices.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SignedCutGreedy, signedcut::GreedyImpl,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()    // a: (batch..., m, n) matrices
        .Arg<ffi::Buffer<ffi::U32>>()    // words: (batch..., w, ceil(n/32)) start signs per cut
        .Ret<ffi::Buffer<ffi::U32>>()    // s_bits: (batch..., w, ceil(m/32)) row signs
        .Ret<ffi::Buffer<ffi::U32>>()    // t_bits: (batch..., w, ceil(n/32)) column signs
        .Ret<ffi::Buffer<ffi::F32>>()    // c: (batch..., w) scales
        .Ret<ffi::Buffer<ffi::S32>>()    // num_cuts: (batch...) cuts made
        .Attr<double>("max_error")       // relative error target; <= 0 for none
        .Attr<int32_t>("impl")           // 0 auto, 1 scalar, 2 avx512
        .Attr<int32_t>("num_threads"));  // <= 0: JAX_SIGNEDCUT_THREADS or all cores, see kernel.h
