#!/usr/bin/env bash
# Builds the C++ extension with AddressSanitizer + UndefinedBehaviorSanitizer
# (CMake option SIGNEDCUT_SANITIZE) and runs the kernel tests against it:
# both implementations (scalar, AVX-512 where the CPU has it), one thread and
# several, odd shapes, flushes of the pending block. Any sanitizer report
# aborts the test process, so the script fails.
#
# Usage: .ci/sanitize.sh            (after the package's test dependencies are
#                                    installed; uses `python` from PATH or $PYTHON)
# Takes about 2-3 minutes on 2 cores (build ~1 min, tests ~1-2 min).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# A sanitized, non-editable copy of the package in its own directory, built in
# its own build dir so that it never mixes with the normal build.
"$PY" -m pip install --quiet --no-build-isolation --no-deps --target "$WORK/site" \
  -C cmake.define.SIGNEDCUT_SANITIZE=ON -C cmake.build-type=RelWithDebInfo \
  -C build-dir=build/sanitize .
cp -r tests conftest.py pyproject.toml "$WORK/"

# `python -S` skips .pth files, so an editable install of the normal build
# cannot shadow the sanitized copy; the environment's site-packages (jax,
# pytest, hypothesis) are put on the path explicitly instead.
SITE=$("$PY" -c "import site; print(':'.join(site.getsitepackages()))")
ASAN_LIB=$(gcc -print-file-name=libasan.so)
[ -f "$ASAN_LIB" ] || { echo "libasan not found (gcc -print-file-name=libasan.so)" >&2; exit 1; }
# libstdc++ preloaded too: jaxlib throws C++ exceptions during start-up and
# ASan's __cxa_throw interceptor needs the real one resolvable at init.
STDCXX_LIB=$(gcc -print-file-name=libstdc++.so)

cd "$WORK"
# Python itself is not instrumented: leak checking would report the
# interpreter's own allocations, so it is off; everything else aborts.
sanitized_pytest() {
  env LD_PRELOAD="$ASAN_LIB $STDCXX_LIB" \
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0 \
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    PYTHONPATH="$WORK/site:$SITE" \
    "$PY" -S -m pytest -q -p no:cacheprovider "$@"
}
sanitized_pytest tests/test_ffi_kernel.py \
  -k "bit_identical or threads or fixed_point or odd_shapes or zero or max_error or extension"
echo "sanitize.sh: kernel tests passed under ASan+UBSan with no report"
# The packed-apply kernel: every core this CPU has (scalar, AVX-512, and the
# bf16 paths: AVX512-BF16 and AMX tiles) against the oracle (odd shapes, the
# table-lookup projection's partial blocks, partial tiles, threads), stray
# tail bits.
sanitized_pytest tests/test_apply.py -rs -k "oracle or tail_bits or equals_scalar or rounded_x or pays"
echo "sanitize.sh: apply kernel tests passed under ASan+UBSan with no report"
# The H-aware cut search handlers: against the jnp search on odd shapes (one
# row, one column, both sides of n < m), its invariants, NaN input, bad buffers;
# the one-call backfit loop (padding, buffers) and the AVX-512 build against the
# baseline build.
sanitized_pytest tests/test_hcut_search.py \
  -k "match_the_jnp or invariants or non_finite or bad_arguments or loop_handler or baseline or kernel_choice"
echo "sanitize.sh: hcut search tests passed under ASan+UBSan with no report"
