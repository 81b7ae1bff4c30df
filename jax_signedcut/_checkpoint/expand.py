"""Dense matrices back from compressed leaves: the expand step of a pipeline."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._core.protocol import check_compressed, map_compressed
from jax_signedcut._signedcut import factors as _factors

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def expand(tree, dtype=jnp.bfloat16):
  """A dense checkpoint back: every compressed leaf becomes its matrices.

  ``reconstruct`` of each compressed leaf (any method), cast to ``dtype``;
  other leaves are kept as they are.

  Args:
    tree: a pytree with compressed leaves (e.g. from :func:`load`).
    dtype: ``jnp.bfloat16`` (default) or ``jnp.float32``.

  Returns:
    The tree with dense (..., m, n) arrays in place of the compressed leaves.

  Raises:
    ValueError: another ``dtype``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import jax_signedcut as sc
    >>> a = jnp.ones((16, 16))
    >>> tree = {"w": sc.decompose(a, key=jax.random.key(0), width=4), "q": sc.rtn(a, bits=4)}
    >>> {k: v.dtype for k, v in sc.expand(tree).items()}
    {'q': dtype(bfloat16), 'w': dtype(bfloat16)}
  """
  dtype = check_dtype(dtype)
  return map_compressed(lambda f: expand_leaf(f, dtype), tree)


def check_dtype(dtype):
  dtype = jnp.dtype(dtype)
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be bfloat16 or float32, got {dtype}")
  return dtype


def expand_leaf(f, dtype) -> jax.Array:
  """``reconstruct`` of one compressed leaf; trailing empty cut slots are skipped."""
  check_compressed(f)
  cuts = _cuts_of(f)
  if cuts is not None and not isinstance(cuts.num_cuts, jax.core.Tracer):
    used = max(1, int(np.max(np.asarray(cuts.num_cuts))) if np.size(cuts.num_cuts) else 1)
    if used < cuts.width:
      f = _factors.truncate(f, used)
  return f.reconstruct(dtype)


def _cuts_of(f):
  try:
    return _factors.split_cuts(f)[0]
  except TypeError:
    return None
