"""The compressed-matrix protocol: what every method's result can do.

Every result type — signed cuts, RTN codes, LPLR factors, a sparse part, a
sum of parts — subclasses :class:`Compressed` and is a frozen dataclass
registered as a pytree (``jax.tree_util.register_dataclass``), so it passes
through ``jax.jit``, ``jax.vmap`` and ``jax.tree`` like any array container.
A subclass provides:

* ``shape``: the static (m, n) of each matrix (for a tensor type, its dims);
* ``batch_shape``: the static leading dims of a stack of them;
* ``_dense()``: the float32 matrices (*batch, m, n), traceable;
* ``stored_bytes()``: bytes stored per matrix, an array of the batch shape
  (traceable, so budgets can be accounted under ``jax.jit``);
* optionally ``_matmul(x, precision)``: ``x @ A`` for one unbatched matrix and
  x (B, m) without materialising A (the default builds the dense matrix);
  ``precision`` matters only to a product that may round (signed cuts on the
  CPU kernel's bf16 cores), and composite types pass it to their parts;
* optionally ``check(name)``: that the arrays agree with ``shape`` and with
  each other (always, from the static shapes) and hold valid values (indices
  in range, counts within capacity; only when the values are concrete). The
  public functions call it at the boundary (:func:`check_compressed`), so a
  malformed value is refused with a message naming the field instead of
  giving a wrong answer or an error from deep inside XLA.

It gets, for free, ``reconstruct(dtype)``, ``nbytes`` (exact, concrete) and
``matmul(x)``. The functions below apply the same to any pytree that holds
compressed leaves; :func:`is_compressed` is the one leaf test.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST


class Compressed:
  """Base class of every compressed-matrix type (see the module docstring).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import jax_signedcut as sc
    >>> a = jax.random.normal(jax.random.key(0), (32, 24))
    >>> q = sc.rtn(a, bits=4)
    >>> isinstance(q, sc.Compressed), q.shape, q.reconstruct().shape
    (True, (32, 24), (32, 24))
    >>> x = jnp.ones((2, 32))
    >>> bool(jnp.allclose(q.matmul(x), x @ q.reconstruct(), atol=1e-4))
    True
  """

  shape: tuple[int, ...]

  @property
  def batch_shape(self) -> tuple[int, ...]:
    raise NotImplementedError

  def _dense(self) -> jax.Array:
    raise NotImplementedError

  def stored_bytes(self) -> jax.Array:
    """Bytes stored for each matrix of the batch: an int/float array of ``batch_shape``."""
    raise NotImplementedError

  def check(self, name: str = "f") -> Compressed:
    """``self`` if its arrays are consistent with its shape, else a ValueError naming ``name``."""
    return self

  def _matmul(self, x2: jax.Array, precision=None) -> jax.Array:
    """``x2 @ A`` in f32 for one unbatched matrix A and f32 rows x2 (B, m).

    ``precision``: a level as ``_kernels.apply.check_precision`` returns it
    (already checked); types whose product is f32 at every level ignore it.
    """
    return jnp.matmul(x2, self._dense(), precision=_HI)

  def reconstruct(self, dtype=jnp.float32) -> jax.Array:
    """The dense matrices (*batch_shape, *shape) in ``dtype``."""
    return _reconstruct(self.check(), jnp.dtype(dtype))

  @property
  def nbytes(self) -> int:
    """Bytes this compressed value stores in all (exact; needs concrete values)."""
    b = self.stored_bytes()
    if isinstance(b, jax.core.Tracer):
      raise TypeError(f"nbytes of a {type(self).__name__} needs concrete values: "
                      "call it outside jax.jit")
    return int(np.sum(np.asarray(b, np.float64)))

  def matmul(self, x: jax.Array, *, precision=None) -> jax.Array:
    """``x @ A`` without materialising A where the type allows.

    Args:
      x: (..., m) activations for an unbatched A; for a batched A of batch
        shape (b...), x is (b..., k, m) (``jnp.matmul`` batching).
      precision: as for ``SignedCutDense``: None / ``"default"`` lets the CPU
        kernel round x to bf16 for signed cuts from 8 rows (f32 sums);
        ``"bf16_bf16_f32"`` rounds the projection too; ``"highest"`` keeps
        every product in f32. Other types compute in f32 at every level.

    Returns:
      f32 (..., n).
    """
    from jax_signedcut._kernels import apply as _apply  # noqa: PLC0415  (apply imports this)
    precision = _apply.check_precision(precision)
    self.check()
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"x must be a float array, got dtype {x.dtype}")
    m, n = self.shape[0], math.prod(self.shape[1:])
    if x.ndim == 0 or x.shape[-1] != m:
      raise ValueError(f"x must have shape (..., {m}) for a matrix of shape {self.shape}, "
                       f"got {x.shape}")
    batch = self.batch_shape
    if not batch:
      lead = x.shape[:-1]
      y = self._matmul(x.reshape(-1, m).astype(jnp.float32), precision)
      return y.reshape(*lead, n)
    if x.ndim < len(batch) + 2 or x.shape[:len(batch)] != batch:
      raise ValueError(f"x must have shape {batch} + (k, {m}) for a stack of shape "
                       f"{batch}, got {x.shape}")
    one = lambda f, x: f.matmul(x, precision=precision)  # noqa: E731
    for _ in batch:
      one = jax.vmap(one)
    # vmap over the leaves' leading axes hands `one` unbatched views of self.
    return one(self, x)


def _reconstruct_impl(f, dtype):
  return f._dense().astype(dtype)  # noqa: SLF001


_reconstruct = jax.jit(_reconstruct_impl, static_argnums=1)


def is_compressed(x: Any) -> bool:
  """The one leaf test: whether ``x`` is a compressed value (any method, any part)."""
  return isinstance(x, Compressed)


def check_compressed(f: Any, name: str = "f") -> Compressed:
  """``f`` if it is a valid compressed value (``f.check``), else an error naming ``name``.

  Raises:
    TypeError: ``f`` is not a compressed value.
    ValueError: its arrays disagree with its shape or hold invalid values.
  """
  if not isinstance(f, Compressed):
    raise TypeError(f"{name} must be a compressed matrix (a SignedCut, QuantizedMatrix, "
                    f"LowRank, Sum, …), got {type(f).__name__}")
  return f.check(name)


def is_concrete(x) -> bool:
  """Whether ``x`` holds values (not a tracer or a ``jax.ShapeDtypeStruct``)."""
  return not isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct))


def check_field(name: str, field: str, x, shape: tuple, kind: str) -> None:
  """That ``name.field`` is an array of ``shape`` whose dtype is of ``kind``.

  ``kind`` is ``"uint32"``, ``"int"`` (any integer dtype) or ``"float"``.

  Raises:
    TypeError: not an array or the wrong dtype. ValueError: the wrong shape.
  """
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name}.{field} must be an array, got {type(x).__name__}")
  dtype = jnp.dtype(x.dtype)
  ok = {"uint32": dtype == jnp.uint32,
        "int": jnp.issubdtype(dtype, jnp.integer),
        "float": jnp.issubdtype(dtype, jnp.floating)}[kind]
  if not ok:
    raise TypeError(f"{name}.{field} must have a {kind} dtype, got {dtype}")
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name}.{field} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def check_range(name: str, field: str, x, lo: int, hi: int) -> None:
  """That every entry of concrete ``name.field`` is in ``[lo, hi]`` (skipped when traced)."""
  if not is_concrete(x) or x.size == 0:
    return
  x_lo, x_hi = (int(v) for v in _min_max(x))
  if x_lo < lo or x_hi > hi:
    bad = x_lo if x_lo < lo else x_hi
    raise ValueError(f"{name}.{field} must hold values in {lo}..{hi}, got {bad}")


def _min_max(x):
  # On the host: a concrete value closed over by a caller's jax.jit is read as it is,
  # where a jitted reduction would be traced. The checked fields are small (counts, indices).
  x = np.asarray(x)
  return x.min(), x.max()


def check_shape(name: str, shape) -> tuple[int, ...]:
  """That a static ``shape`` is a tuple of positive ints."""
  if not isinstance(shape, tuple) or not shape or not all(
      isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in shape):
    raise ValueError(f"{name}.shape must be a tuple of positive ints, got {shape!r}")
  return tuple(int(d) for d in shape)


def map_compressed(fn, tree, *rest):
  """``fn`` on every compressed leaf of ``tree`` (and the matching leaves of ``rest``)."""
  return jax.tree.map(lambda f, *r: fn(f, *r) if is_compressed(f) else f, tree, *rest,
                      is_leaf=is_compressed)


def compressed_leaves(tree) -> list:
  """The compressed leaves of ``tree``, in ``jax.tree`` order."""
  return [x for x in jax.tree.leaves(tree, is_leaf=is_compressed) if is_compressed(x)]


def _is_array_like(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, float, int, complex))


def reconstruct(tree, dtype=jnp.float32):
  """Dense matrices of a compressed value, or of every compressed leaf of a pytree.

  Other leaves are kept as they are.

  Args:
    tree: a compressed value (any method) or a pytree holding some.
    dtype: the dtype of the dense result.

  Returns:
    (*batch, m, n) ``dtype`` for a compressed value; for a pytree, the same
    structure with every compressed leaf replaced by its dense matrices.

  Raises:
    TypeError: ``tree`` is a bare array (nothing to reconstruct).

  Example:
    >>> import jax
    >>> import jax_signedcut as sc
    >>> a = jax.random.normal(jax.random.key(0), (16, 12))
    >>> tree = {"q": sc.rtn(a, bits=8), "b": jax.numpy.zeros(3)}
    >>> {k: v.shape for k, v in sc.reconstruct(tree).items()}
    {'b': (3,), 'q': (16, 12)}
  """
  if is_compressed(tree):
    return check_compressed(tree, "tree").reconstruct(dtype)
  if _is_array_like(tree):
    raise TypeError(f"reconstruct takes a compressed matrix or a pytree of them, got a "
                    f"{type(tree).__name__}")
  return map_compressed(lambda f: f.reconstruct(dtype), tree)


def nbytes(tree) -> int:
  """Bytes stored by a compressed value, or by all compressed leaves of a pytree.

  Dense leaves of a pytree are not counted. Needs concrete values (call it
  outside ``jax.jit``).

  Raises:
    TypeError: ``tree`` is a bare array, or the values are traced.
  """
  if is_compressed(tree):
    return tree.nbytes
  if _is_array_like(tree):
    raise TypeError(f"nbytes takes a compressed matrix or a pytree of them, got a "
                    f"{type(tree).__name__}")
  return sum(f.nbytes for f in compressed_leaves(tree))


def matmul(x: jax.Array, f: Compressed, *, precision=None) -> jax.Array:
  """``x @ A`` for a compressed A without materialising it where its type allows
  (``precision``: see :meth:`Compressed.matmul`)."""
  return check_compressed(f).matmul(x, precision=precision)


def relative_error(a, f):
  """‖a − reconstruct(f)‖_F / ‖a‖_F per matrix, shape (*batch). 0/0 gives 0.

  ``a`` and ``f`` may also be pytrees of the same structure: the result then
  has that structure, with the error at every compressed leaf of ``f`` and
  None elsewhere.

  Raises:
    TypeError: ``f`` holds no compressed value where ``a`` has an array.
    ValueError: the shapes of ``a`` and ``f`` do not match.
  """
  if not is_compressed(f):
    if _is_array_like(f) or _is_array_like(a):
      check_compressed(f)
    return jax.tree.map(lambda fl, al: relative_error(al, fl) if is_compressed(fl) else None,
                        f, a, is_leaf=is_compressed)
  check_compressed(f)
  from jax_signedcut._core import checks as _checks  # noqa: PLC0415
  a = jnp.asarray(_checks.as_array("a", a))
  want = tuple(f.batch_shape) + tuple(f.shape)
  if a.shape != want:
    raise ValueError(f"a has shape {a.shape} but f compresses matrices of shape {want}")
  return _relative_error(a, f)


@jax.jit
def _relative_error(a, f):
  # One compiled program per shape and type: eagerly, a reconstruction's ops
  # would otherwise dispatch one by one.
  from jax_signedcut._core import scaling as _scaling  # noqa: PLC0415
  a = a.astype(jnp.float32)
  axes = tuple(range(len(f.batch_shape), a.ndim))
  # Both norms of A·2⁻ᵏ (exact, k from max|A|), so that huge matrices do not overflow.
  k = _scaling.exponent(a, axes)
  k = k.reshape(k.shape + (1,) * len(axes))
  num = jnp.sqrt(jnp.sum(jnp.square(_scaling.ldexp(a - f._dense(), -k)), axis=axes))  # noqa: SLF001
  den = jnp.sqrt(jnp.sum(jnp.square(_scaling.ldexp(a, -k)), axis=axes))
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), num)
