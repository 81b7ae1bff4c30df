// nanobind module exposing the XLA FFI handlers to Python as a dict of
// PyCapsules, registered once at import by jax_signedcut/_ffi.py.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

NB_MODULE(_signedcut_ffi, m) {
  m.def("registrations", []() {
    nb::dict d;
    return d;
  });
}
