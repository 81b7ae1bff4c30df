#!/usr/bin/env bash
# Builds BUILD.bazel's //:libsignedcut_ffi.so offline with Debian's
# bazel-bootstrap (installed here if missing) against the installed jaxlib's
# XLA FFI headers, and prints the library's path. Export it for the test:
#   export JAX_SIGNEDCUT_BAZEL_LIB=$(.ci/bazel.sh | tail -1)
#   python -m pytest tests/test_bazel_build.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

# bazel-rules-java provides the rules_java that @bazel_tools loads even for a
# C++-only build (Bazel would otherwise download it).
if ! command -v bazel >/dev/null 2>&1 || ! dpkg -s bazel-rules-java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq bazel-bootstrap bazel-rules-java >&2
fi

# The headers of the jaxlib the Python package runs with.
INCLUDE=$("$PY" -c "import jax; print(jax.ffi.include_dir())")
ln -sfn "$INCLUDE" bazel/jaxlib_include

# No network: the rules Bazel would fetch come from the Debian packages
# (their location differs between releases) or from the local stub in
# bazel/rules_cc_stub.
first_dir() { for d in "$@"; do [ -d "$d" ] && { echo "$d"; return 0; }; done; return 0; }
PLATFORMS=$(first_dir /usr/share/bazel/platforms /usr/share/bazel/tools/platforms)
RULES_JAVA=$(first_dir /usr/share/bazel/rules/java /usr/share/bazel/rules_java)
OVERRIDES=(--override_repository=rules_cc="$PWD/bazel/rules_cc_stub")
[ -n "$PLATFORMS" ] && OVERRIDES+=(--override_repository=platforms="$PLATFORMS")
[ -n "$RULES_JAVA" ] && OVERRIDES+=(--override_repository=rules_java="$RULES_JAVA")

bazel build >&2 "${OVERRIDES[@]}" //:libsignedcut_ffi.so
echo "$PWD/bazel-bin/libsignedcut_ffi.so"
