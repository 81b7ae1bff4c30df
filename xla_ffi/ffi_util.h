// Small helpers shared by the XLA FFI handlers (ffi.cc, apply_ffi.cc).
#ifndef JAX_SIGNEDCUT_XLA_FFI_FFI_UTIL_H_
#define JAX_SIGNEDCUT_XLA_FFI_FFI_UTIL_H_

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace signedcut {

// A shape as Python prints it, "(3, 4)" or "(5,)", for error messages.
inline std::string DimsToString(xla::ffi::Span<const int64_t> d) {
  std::string s = "(";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + (d.size() == 1 ? ",)" : ")");
}

}  // namespace signedcut

#endif  // JAX_SIGNEDCUT_XLA_FFI_FFI_UTIL_H_
