"""Flax NNX layer holding a compressed kernel, and model surgery.

* :class:`PackedFactor` — the ``nnx.Variable`` type whose value is a layer's
  whole compressed kernel: a :class:`~jax_signedcut.SignedCut`, a
  :class:`~jax_signedcut.Sum` of parts, a :class:`~jax_signedcut.QuantizedMatrix`,
  a :class:`~jax_signedcut.LowRank` … (any :class:`~jax_signedcut.Compressed`,
  a registered pytree). ``nnx.state(model, PackedFactor)`` has the structure of
  the ``decompose`` result it came from: ``…/NAME/kernel`` holds the
  compressed value; an optimizer over ``nnx.Param`` never sees it.
* :class:`SignedCutDense` (alias :data:`CompressedDense`) — ``y = x·W + b``
  with W (in, out) in the Flax kernel layout, computed from the compressed
  value (for signed cuts from the packed bits, without the dense W).
* :func:`swap_linears` — replaces the ``nnx.Linear`` layers whose kernels
  were compressed, by any method, with ``SignedCutDense`` layers, in place.

The layer holds the compressed value whole rather than one Variable per
field: a part added to a decomposition (a sparse part, a low-rank part, a
new method's factors) reaches the layer, its checkpoints and its
transformations without a line changed here.

Example:
  >>> import jax
  >>> from flax import nnx
  >>> import jax_signedcut as sc
  >>> from jax_signedcut.nnx import PackedFactor, SignedCutDense, swap_linears
  >>> model = nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(0)), nnx.relu,
  ...                        nnx.Linear(64, 16, rngs=nnx.Rngs(1)))
  >>> f = sc.decompose(nnx.state(model, nnx.Param), key=jax.random.key(0), rate=0.5)
  >>> swap_linears(model, f)
  >>> type(model.layers[0]).__name__
  'SignedCutDense'
  >>> type(nnx.state(model, PackedFactor)["layers"][0]["kernel"].get_value()).__name__
  'Sum'
  >>> model(jax.numpy.ones((4, 32))).shape
  (4, 16)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_signedcut._core import checks as _checks
from jax_signedcut._core import tree as _tree
from jax_signedcut._core.protocol import Compressed, check_compressed, is_compressed
from jax_signedcut._kernels.apply import apply_signed_cut, check_precision
from jax_signedcut._signedcut import packing as _packing
from jax_signedcut._signedcut.factors import SignedCut, split_cuts

__all__ = ["CompressedDense", "PackedFactor", "SignedCutDense", "apply_signed_cut",
           "swap_linears"]


class PackedFactor(nnx.Variable):
  """A compressed kernel, held whole: the value is the compressed pytree.

  Not an ``nnx.Param``: never trained by an optimizer built on ``nnx.Param``.
  The scales of signed cuts are part of the decomposition (``c_j`` is the
  projection of the remainder on cut j), so they are not parameters either.
  """


class SignedCutDense(nnx.Module):
  """A linear layer whose (in, out) kernel is held compressed.

  For signed cuts ``y = ((x·S) ∘ c)·Tᵀ + b``, where S holds the row signs
  (in × w), T the column signs (out × w) and c the w scales; other parts and
  methods use their own product (:meth:`jax_signedcut.Compressed.matmul`).
  The dense kernel is never built unless ``dense=True``.

  The constructor makes a layer of random signed cuts (for tests and
  benchmarks); :meth:`from_factors`, :meth:`from_linear` and
  :func:`swap_linears` make one holding any compressed kernel.

  Args:
    in_features: m, the input size.
    out_features: n, the output size.
    width: number of cut slots w.
    use_bias: whether to hold an ``nnx.Param`` bias (n,).
    dense: expand the kernel to a dense matrix on every call and use one
      GEMM. For signed cuts expanding costs w·m·n multiply-adds, so this only
      pays from a batch of roughly w·m·n / (w·(m+n) − m·n) rows (≈ 2300 for
      4096² at rate ½; ``benchmarks/DENSE_RESULTS.md``); to expand once and
      reuse, use :meth:`to_linear`.
    precision: how much the CPU kernel may round, as for
      :func:`~jax_signedcut.nnx.apply_signed_cut` (like ``nnx.Linear``'s
      ``precision``): ``None`` / ``"default"`` (x rounded to bf16 from 8 rows
      where the CPU has AMX or AVX512-BF16, p in two bf16 halves),
      ``"bf16_bf16_f32"`` / ``jax.lax.DotAlgorithmPreset.BF16_BF16_F32``
      (p in one bf16 too: faster), ``"highest"`` / ``jax.lax.Precision.HIGHEST``
      (f32). A static attribute: not part of the layer's state or checkpoints.
    rngs: if given, random sign bits and scales ``1/sqrt(w·in)`` (a kernel of
      LeCun-normal variance), otherwise zero cuts.

  Attributes:
    kernel: the :class:`PackedFactor` holding the compressed (in, out) kernel
      (batch shape (L,) for ``nnx.scan``-stacked layers).
    bias: an ``nnx.Param`` (n,), or None.

  Example:
    >>> layer = SignedCutDense(8, 4, width=16, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 8))).shape
    (2, 4)
    >>> type(nnx.state(layer, PackedFactor)["kernel"].get_value()).__name__
    'SignedCut'
  """

  def __init__(self, in_features: int, out_features: int, *, width: int, use_bias: bool = True,
               dense: bool = False, precision=None, rngs: nnx.Rngs | None = None):
    # numpy integers (np.int64 from a config array) are ints too; stored as Python ints.
    in_features, out_features, width = (
        _checks.integer(name, v, minimum=1, error=ValueError)
        for name, v in (("in_features", in_features), ("out_features", out_features),
                        ("width", width)))
    self.in_features, self.out_features = in_features, out_features
    self.dense = dense
    check_precision(precision)  # a bad value fails here, naming the argument
    self.precision = precision
    self.kernel = PackedFactor(_cuts(in_features, out_features, width, rngs))
    # nnx.data: a bias None now may become a Param in from_factors.
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else nnx.data(None)

  @classmethod
  def from_factors(cls, f: Compressed, bias: jax.Array | None = None, *,
                   dense: bool = False, precision=None) -> SignedCutDense:
    """A layer holding ``f``: one compressed (in, out) matrix, or a stack (L, …) for nnx.scan.

    Args:
      f: any compressed matrix (a ``SignedCut``, a ``Sum`` of parts, a
        ``QuantizedMatrix``, a ``LowRank`` …).
      bias: optional bias of shape ``f.batch_shape + (out,)``.
      dense, precision: as for the constructor.

    Raises:
      TypeError: ``f`` is not a compressed matrix.
      ValueError: ``f`` is not a matrix, ``bias`` does not have shape
        f.batch_shape + (out,), or an unknown ``precision``.
    """
    check_compressed(f)
    if len(f.shape) != 2:
      raise ValueError(f"f must compress (in, out) matrices, got shape {tuple(f.shape)}")
    m, n = f.shape
    if bias is not None and tuple(jnp.shape(bias)) != f.batch_shape + (n,):
      raise ValueError(f"bias must have shape {f.batch_shape + (n,)} for factors of shape "
                       f"{f.shape}, got {tuple(jnp.shape(bias))}")
    # The constructor builds random signed cuts only; a one-cut placeholder is
    # made and replaced by f (NNX modules are mutable).
    layer = cls(m, n, width=1, use_bias=False, dense=dense, precision=precision)
    layer.kernel = PackedFactor(f)
    if bias is not None:
      layer.bias = nnx.Param(jnp.asarray(bias))
    return layer

  @classmethod
  def from_linear(cls, linear: nnx.Linear, f: Compressed, *,
                  dense: bool = False, precision=None) -> SignedCutDense:
    """The layer replacing ``linear`` with ``f``, a compressed form of its kernel (bias copied).

    ``precision`` is the new layer's (as for the constructor), not copied
    from ``linear``: the kernel's levels are not XLA's.

    Raises:
      TypeError: ``f`` is not a compressed matrix.
      ValueError: ``f`` does not compress a matrix of ``linear``'s kernel shape.
    """
    check_compressed(f)
    kshape = tuple(linear.kernel.shape)
    if f.batch_shape + tuple(f.shape) != kshape:
      raise ValueError(
          f"the factors decompose matrices of shape {f.batch_shape + tuple(f.shape)} but the "
          f"Linear's kernel has shape {kshape} (in_features={linear.in_features}, "
          f"out_features={linear.out_features})")
    bias = None if linear.bias is None else linear.bias[...]
    return cls.from_factors(f, bias, dense=dense, precision=precision)

  @property
  def factors(self) -> Compressed:
    """The held compressed kernel."""
    return self.kernel.get_value()

  @property
  def width(self) -> int | None:
    """Cut slots of the signed cuts held (alone or in a ``Sum``); None for other methods."""
    try:
      return split_cuts(self.factors)[0].width
    except TypeError:
      return None

  def to_linear(self, *, dtype=None, param_dtype=jnp.float32) -> nnx.Linear:
    """An ``nnx.Linear`` holding the reconstructed dense kernel: expand once, reuse.

    For serving at large batch this beats ``dense=True`` (which expands on
    every call) and the factored product (see ``benchmarks/DENSE_RESULTS.md``).

    Raises:
      ValueError: the layer holds a stack of kernels.
    """
    f = self.factors
    if f.batch_shape:
      raise ValueError(f"to_linear needs one matrix, got a stack of batch shape {f.batch_shape}")
    linear = nnx.Linear(self.in_features, self.out_features, use_bias=self.bias is not None,
                        dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    linear.kernel = nnx.Param(f.reconstruct(param_dtype))
    if self.bias is not None:
      linear.bias = nnx.Param(self.bias[...].astype(param_dtype))
    return linear

  def __call__(self, x: jax.Array) -> jax.Array:
    bias = None if self.bias is None else self.bias[...]
    return apply_signed_cut(x, self.factors, bias, dense=self.dense, precision=self.precision)


#: The same layer under the name that says it holds any compressed kernel.
CompressedDense = SignedCutDense


def _cuts(m: int, n: int, width: int, rngs: nnx.Rngs | None) -> SignedCut:
  """Random signed cuts of an (m, n) kernel (``rngs`` given) or zero ones."""
  mw, nw = _packing.num_words(m), _packing.num_words(n)
  if rngs is None:
    return SignedCut(jnp.zeros((width, mw), jnp.uint32), jnp.zeros((width, nw), jnp.uint32),
                     jnp.zeros((width,), jnp.float32), jnp.int32(0), shape=(m, n))
  s = jax.random.bits(rngs.params(), (width, mw), jnp.uint32)
  t = jax.random.bits(rngs.params(), (width, nw), jnp.uint32)
  # Bits past m (n) in the last word are kept 0, as the packing requires.
  s = s.at[:, -1].set(s[:, -1] & jnp.uint32(_packing.tail_mask(m)))
  t = t.at[:, -1].set(t[:, -1] & jnp.uint32(_packing.tail_mask(n)))
  c = jnp.full((width,), 1.0 / math.sqrt(width * m), jnp.float32)
  return SignedCut(s, t, c, jnp.int32(width), shape=(m, n))


def _set_child(model, path, new):
  parent = model
  for k in path[:-1]:
    parent = parent[k] if isinstance(k, int) or not hasattr(parent, str(k)) else getattr(parent, k)
  last = path[-1]
  if isinstance(last, int) or not hasattr(parent, str(last)):
    parent[last] = new
  else:
    setattr(parent, last, new)


def swap_linears(model: nnx.Module, factors=None, *, dense: bool = False, precision=None,
                 **decompose_kwargs):
  """Replaces, in place, every ``nnx.Linear`` of ``model`` with a compressed kernel.

  Args:
    model: an NNX module.
    factors: a pytree over ``nnx.state(model)`` (or its ``nnx.Param`` part)
      with compressed leaves of any method — a ``decompose``, ``sc.rtn`` or
      ``sc.lplr`` result, or ``nnx.state(other, PackedFactor)`` of a swapped
      model: the Linear whose ``kernel`` path holds a compressed value
      becomes a :class:`SignedCutDense` holding it, the others stay.
      ``None``: decompose here with ``decompose_kwargs`` (``key``, ``rules``,
      ``rate`` …, as for :func:`jax_signedcut.decompose`).
    dense, precision: passed to each new layer.
    **decompose_kwargs: only with ``factors=None``.

  Returns:
    None; the model is changed in place (NNX modules are mutable).

  Raises:
    ValueError: a compressed value whose shape does not match the Linear's
      kernel, or compressed values at paths that are not the kernel of an
      ``nnx.Linear`` (all such paths are named).
  """
  from jax_signedcut._signedcut.decompose import decompose  # noqa: PLC0415
  if factors is None:
    if not decompose_kwargs:
      raise ValueError("swap_linears needs factors or decompose arguments (key=..., rules=...)")
    factors = decompose(nnx.state(model, nnx.Param), **decompose_kwargs)
  elif decompose_kwargs:
    raise ValueError(f"decompose arguments {sorted(decompose_kwargs)} are only used when "
                     "factors is None")
  flat, _ = jax.tree_util.tree_flatten_with_path(factors, is_leaf=is_compressed)
  by_path = {_tree.leaf_path(kp): f for kp, f in flat if is_compressed(f)}
  swaps = []
  for path, module in nnx.iter_modules(model):
    if type(module) is nnx.Linear:
      kpath = "/".join(map(str, path + ("kernel",)))
      f = by_path.pop(kpath, None)
      if f is not None:
        swaps.append((path, SignedCutDense.from_linear(module, f, dense=dense,
                                                                precision=precision)))
  if by_path:
    raise ValueError("compressed values at paths that are not the kernel of an nnx.Linear in "
                     "the model: " + ", ".join(sorted(by_path)))
  for path, new in swaps:
    if not path:
      raise ValueError("the model itself is an nnx.Linear: use SignedCutDense.from_linear")
    _set_child(model, path, new)
