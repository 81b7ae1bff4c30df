"""Progress of a running decomposition, read from the C++ kernel's cut counter.

JAX dispatches a jitted call asynchronously: ``decompose`` returns at once with
arrays that are not ready yet, while the FFI kernel works on another thread.
The kernel counts every cut it records (process-wide, monotonic:
``_signedcut_ffi.cuts_done()``), so the leaf-by-leaf paths (the CLI,
``decompose_leafwise``) can show a per-matrix bar that moves as cuts are found,
not an estimate. Elsewhere (no extension, the jnp backend) the bar only jumps
to the end when the result is ready.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import jax

#: Matrices with fewer entries × cuts than this get no bar of their own.
MIN_WORK = 1 << 31
#: Seconds between two reads of the counter.
POLL_SECONDS = 0.1


def cuts_done() -> int | None:
  """Cuts recorded by the C++ kernel in this process so far, or None without the extension."""
  from jax_signedcut._kernels import extension  # noqa: PLC0415
  ext = extension.module()
  return None if ext is None else int(ext.cuts_done())


def _ready(tree: Any) -> bool:
  return all(x.is_ready() for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))


def run_with_progress(fn: Callable[[], Any], *, total_cuts: int, desc: str,
                      enabled: bool = True) -> Any:
  """Calls ``fn()`` (which dispatches a decomposition) and waits for its result under a bar.

  Args:
    fn: a function of no arguments that returns a pytree of jax arrays (for
      example a jitted ``decompose`` call); it is called exactly once.
    total_cuts: the cuts the call may record at most (matrices × width); an
      early stop by ``max_error`` ends the bar early.
    desc: the bar's label (a leaf path).
    enabled: False: no bar, just wait.

  Returns:
    ``fn()``'s result, ready.
  """
  if not enabled or total_cuts <= 0:
    return jax.block_until_ready(fn())
  from tqdm.auto import tqdm  # noqa: PLC0415
  start = cuts_done()
  out = fn()
  # disable=None: no bar when stderr is not a terminal (a log file, a pipe), as the leaf bar.
  with tqdm(total=total_cuts, desc=desc, unit="cut", leave=False, dynamic_ncols=True,
            file=sys.stderr, disable=None) as bar:
    while not _ready(out):
      if start is not None:
        bar.update(min(total_cuts, cuts_done() - start) - bar.n)
      time.sleep(POLL_SECONDS)
    bar.update(total_cuts - bar.n)
  return jax.block_until_ready(out)
