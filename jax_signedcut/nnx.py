"""Flax NNX layer holding a signed cut decomposition, and model surgery.

* :class:`PackedFactor` — the ``nnx.Variable`` type of the packed factors
  (sign words, scales, cut count). Filter with ``nnx.state(model, PackedFactor)``;
  an optimizer over ``nnx.Param`` never sees them.
* :class:`SignedCutDense` — ``y = x·W + b`` with ``W = S·diag(c)·Tᵀ`` in the Flax
  kernel layout (in, out), computed from the packed bits.
* :func:`swap_linears` — replaces the selected ``nnx.Linear`` layers of a model
  by ``SignedCutDense`` layers, in place.

Why ``c`` is a :class:`PackedFactor` and not an ``nnx.Param``: the scales are
part of the decomposition (``c_j`` is the projection of the remainder on cut j,
so changing one alone no longer matches ``num_cuts`` or the error the greedy
run recorded), and keeping all factor data in one collection makes "the
compressed part" a single filter for saving, sharding or freezing. Fine-tuning
the scales remains possible by selecting them explicitly
(``nnx.All(PackedFactor, nnx.PathContains('c'))``) — they are floats.

Example:
  >>> import jax
  >>> from flax import nnx
  >>> import jax_signedcut as sc
  >>> from jax_signedcut.nnx import SignedCutDense, swap_linears
  >>> model = nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(0)), nnx.relu,
  ...                        nnx.Linear(64, 16, rngs=nnx.Rngs(1)))
  >>> f = sc.decompose(nnx.state(model, nnx.Param), key=jax.random.key(0), rate=0.5)
  >>> swap_linears(model, f)
  >>> type(model.layers[0]).__name__
  'SignedCutDense'
  >>> model(jax.numpy.ones((4, 32))).shape
  (4, 16)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_signedcut._signedcut import packing as _packing
from jax_signedcut._core import tree as _tree
from jax_signedcut._kernels.apply import apply_signed_cut
from jax_signedcut._signedcut.factors import SignedCut

__all__ = ["PackedFactor", "SignedCutDense", "apply_signed_cut", "swap_linears"]


class PackedFactor(nnx.Variable):
  """Packed signed cut factors: uint32 sign words, f32 scales, the cut count.

  Not an ``nnx.Param``: never trained by an optimizer built on ``nnx.Param``.
  """


class SignedCutDense(nnx.Module):
  """A linear layer whose (in, out) kernel is a signed cut decomposition.

  ``y = ((x·S) ∘ c)·Tᵀ + b`` where S holds the row signs (in × w), T the column
  signs (out × w) and c the w scales; the dense kernel is never built unless
  ``dense=True``.

  Args:
    in_features: m, the input size.
    out_features: n, the output size.
    width: number of cut slots w.
    use_bias: whether to hold an ``nnx.Param`` bias (n,).
    dense: expand the factors to a dense kernel on every call and use one
      GEMM. Expanding costs w·m·n multiply-adds, so this only pays from a
      batch of roughly w·m·n / (w·(m+n) − m·n) rows (≈ 2300 for 4096² at
      rate ½; measured ≈ 1300–2600 here, ``benchmarks/DENSE_RESULTS.md``);
      to expand once and reuse, use :meth:`to_linear`.
    rngs: if given, random sign bits and scales ``1/sqrt(w·in)`` (a kernel of
      LeCun-normal variance; useful for tests and benchmarks), otherwise zeros
      (to be filled by :meth:`from_factors` / :func:`swap_linears`).

  Example:
    >>> layer = SignedCutDense(8, 4, width=16, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 8))).shape
    (2, 4)
    >>> sorted(nnx.state(layer, PackedFactor).keys())
    ['c', 'num_cuts', 's_bits', 't_bits']
  """

  def __init__(self, in_features: int, out_features: int, *, width: int, use_bias: bool = True,
               dense: bool = False, rngs: nnx.Rngs | None = None):
    for name, v in (("in_features", in_features), ("out_features", out_features),
                    ("width", width)):
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    self.in_features, self.out_features, self.width = in_features, out_features, width
    self.dense = dense
    mw, nw = _packing.num_words(in_features), _packing.num_words(out_features)
    if rngs is None:
      s = jnp.zeros((width, mw), jnp.uint32)
      t = jnp.zeros((width, nw), jnp.uint32)
      c = jnp.zeros((width,), jnp.float32)
    else:
      s = jax.random.bits(rngs.params(), (width, mw), jnp.uint32)
      t = jax.random.bits(rngs.params(), (width, nw), jnp.uint32)
      s = s.at[:, -1].set(s[:, -1] & jnp.uint32(_packing.tail_mask(in_features)))
      t = t.at[:, -1].set(t[:, -1] & jnp.uint32(_packing.tail_mask(out_features)))
      c = jnp.full((width,), 1.0 / math.sqrt(width * in_features), jnp.float32)
    self.s_bits = PackedFactor(s)
    self.t_bits = PackedFactor(t)
    self.c = PackedFactor(c)
    self.num_cuts = PackedFactor(jnp.asarray(width if rngs is not None else 0, jnp.int32))
    # The sparse part of an outlier-aware decomposition (set by from_factors).
    self.sparse_idx = self.sparse_val = self.num_sparse = nnx.data(None)
    # The low-rank part U·Vᵀ (bf16, set by from_factors).
    self.lr_u = self.lr_v = nnx.data(None)
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None

  @classmethod
  def from_factors(cls, f: SignedCut, bias: jax.Array | None = None, *,
                   dense: bool = False) -> SignedCutDense:
    """A layer holding ``f`` (one (in, out) matrix, or stacked (L, …) for nnx.scan).

    Raises:
      TypeError: ``f`` is not a SignedCut.
      ValueError: ``bias`` does not have shape f.batch_shape + (out,).
    """
    if not isinstance(f, SignedCut):
      raise TypeError(f"f must be a SignedCut, got {type(f).__name__}")
    m, n = f.shape
    if bias is not None and tuple(jnp.shape(bias)) != f.batch_shape + (n,):
      raise ValueError(f"bias must have shape {f.batch_shape + (n,)} for factors of shape "
                       f"{f.shape}, got {tuple(jnp.shape(bias))}")
    layer = cls(m, n, width=f.width, use_bias=bias is not None, dense=dense)
    layer.s_bits = PackedFactor(f.s_bits)
    layer.t_bits = PackedFactor(f.t_bits)
    layer.c = PackedFactor(f.c)
    layer.num_cuts = PackedFactor(f.num_cuts)
    if f.sparse_idx is not None:
      layer.sparse_idx = PackedFactor(f.sparse_idx)
      layer.sparse_val = PackedFactor(f.sparse_val)
      layer.num_sparse = PackedFactor(f.num_sparse)
    if f.lr_u is not None:
      layer.lr_u = PackedFactor(f.lr_u)
      layer.lr_v = PackedFactor(f.lr_v)
    if bias is not None:
      layer.bias = nnx.Param(jnp.asarray(bias))
    return layer

  @classmethod
  def from_linear(cls, linear: nnx.Linear, f: SignedCut, *, dense: bool = False) -> SignedCutDense:
    """The layer replacing ``linear`` with factors ``f`` of its kernel (bias copied).

    Raises:
      ValueError: ``f`` does not decompose a matrix of ``linear``'s kernel shape.
    """
    kshape = tuple(linear.kernel.shape)
    if not isinstance(f, SignedCut):
      raise TypeError(f"f must be a SignedCut, got {type(f).__name__}")
    if f.batch_shape + tuple(f.shape) != kshape:
      raise ValueError(
          f"the factors decompose matrices of shape {f.batch_shape + tuple(f.shape)} but the "
          f"Linear's kernel has shape {kshape} (in_features={linear.in_features}, "
          f"out_features={linear.out_features})")
    bias = None if linear.bias is None else linear.bias[...]
    return cls.from_factors(f, bias, dense=dense)

  def to_linear(self, *, dtype=None, param_dtype=jnp.float32) -> nnx.Linear:
    """An ``nnx.Linear`` holding the reconstructed dense kernel: expand once, reuse.

    For serving at large batch this beats ``dense=True`` (which expands on
    every call) and the factored product (see ``benchmarks/DENSE_RESULTS.md``).
    """
    if self.c[...].ndim != 1:
      raise ValueError(f"to_linear needs one matrix, got stacked factors "
                       f"{self.factors.batch_shape}")
    from jax_signedcut._signedcut.factors import reconstruct  # noqa: PLC0415
    linear = nnx.Linear(self.in_features, self.out_features, use_bias=self.bias is not None,
                        dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    linear.kernel = nnx.Param(reconstruct(self.factors, param_dtype))
    if self.bias is not None:
      linear.bias = nnx.Param(self.bias[...].astype(param_dtype))
    return linear

  @property
  def factors(self) -> SignedCut:
    """The held decomposition as a :class:`SignedCut`."""
    sparse = {}
    if self.sparse_idx is not None:
      sparse = dict(sparse_idx=self.sparse_idx[...], sparse_val=self.sparse_val[...],
                    num_sparse=self.num_sparse[...])
    if self.lr_u is not None:
      sparse.update(lr_u=self.lr_u[...], lr_v=self.lr_v[...])
    return SignedCut(self.s_bits[...], self.t_bits[...], self.c[...], self.num_cuts[...],
                     shape=(self.in_features, self.out_features), **sparse)

  def __call__(self, x: jax.Array) -> jax.Array:
    bias = None if self.bias is None else self.bias[...]
    return apply_signed_cut(x, self.factors, bias, dense=self.dense)


def _set_child(model, path, new):
  parent = model
  for k in path[:-1]:
    parent = parent[k] if isinstance(k, int) or not hasattr(parent, str(k)) else getattr(parent, k)
  last = path[-1]
  if isinstance(last, int) or not hasattr(parent, str(last)):
    parent[last] = new
  else:
    setattr(parent, last, new)


def swap_linears(model: nnx.Module, factors=None, *, dense: bool = False, **decompose_kwargs):
  """Replaces, in place, every selected ``nnx.Linear`` of ``model`` by a ``SignedCutDense``.

  Args:
    model: an NNX module.
    factors: a ``decompose`` result on ``nnx.state(model)`` (or its
      ``nnx.Param`` part): the Linear whose ``kernel`` path holds a
      ``SignedCut`` is swapped, the others stay. ``None``: decompose here with
      ``decompose_kwargs`` (``key``, ``rules``, ``rate`` …, as for
      :func:`jax_signedcut.decompose`).
    dense: passed to each new layer.
    **decompose_kwargs: only with ``factors=None``.

  Returns:
    None; the model is changed in place (NNX modules are mutable).

  Raises:
    ValueError: factors whose shape does not match the Linear's kernel, or a
      ``SignedCut`` at a path that is not the kernel of an ``nnx.Linear``.
  """
  from jax_signedcut._signedcut.decompose import decompose  # noqa: PLC0415
  if factors is None:
    if not decompose_kwargs:
      raise ValueError("swap_linears needs factors or decompose arguments (key=..., rules=...)")
    factors = decompose(nnx.state(model, nnx.Param), **decompose_kwargs)
  elif decompose_kwargs:
    raise ValueError(f"decompose arguments {sorted(decompose_kwargs)} are only used when "
                     "factors is None")
  flat, _ = jax.tree_util.tree_flatten_with_path(factors, is_leaf=lambda x: isinstance(x, SignedCut))
  by_path = {_tree.leaf_path(kp): f for kp, f in flat if isinstance(f, SignedCut)}
  swaps = []
  for path, module in nnx.iter_modules(model):
    if type(module) is nnx.Linear:
      kpath = "/".join(map(str, path + ("kernel",)))
      f = by_path.pop(kpath, None)
      if f is not None:
        swaps.append((path, SignedCutDense.from_linear(module, f, dense=dense)))
  if by_path:
    raise ValueError("factors at paths that are not the kernel of an nnx.Linear in the model: "
                     + ", ".join(sorted(by_path)))
  for path, new in swaps:
    if not path:
      raise ValueError("the model itself is an nnx.Linear: use SignedCutDense.from_linear")
    _set_child(model, path, new)
