"""Input statistics of a model's linear layers: H = Σ xᵀx per kernel, and a file format for them.

For a linear layer ``y = x W`` (Flax layout, ``W`` of shape (in, out)) and the
inputs ``X`` (N × in) it sees on calibration data, the output error of an
approximation ``Ŵ`` is ``‖X (W − Ŵ)‖²_F = tr(Eᵀ H E)`` with ``E = W − Ŵ`` and
``H = Xᵀ X``. :func:`calibrate` (Flax NNX) and :func:`calibrate_linen` run a
model over batches and accumulate ``H`` for every ``nnx.Linear`` /
``linen.Dense`` kernel, streaming: only one (in, in) float64 sum per kernel is
kept on the host, whatever the number of batches. Tokens a mask marks as
padding are left out.

The result is a :class:`Calibration`: ``hessians`` maps each kernel's
``/``-joined parameter path (``layers/0/query/kernel``, the names
``jax_signedcut.decompose`` gives pytree leaves) to the normalised second
moment ``H / N`` (in, in) float32, ``tokens`` is N.

File format (so that other frameworks can supply statistics): a safetensors
file whose tensor names are the weight names of the checkpoint being
compressed, each an (in, in) float32 matrix ``H / N``, with header metadata

    {"format": "jax_signedcut.calibration", "layout": "torch" | "flax", "tokens": "<N>"}

and optionally ``"sensitivities": "{\"<name>\": <float >= 0>, ...}"`` (a JSON object, one
finite number >= 0 for every tensor: the model's loss per unit of that weight's squared
relative output error, for ``jax-signedcut compress --allocate``) and
``"weight_sensitivities"`` (the same for weights *without* a tensor in the file, such as
embedding tables: the loss per unit of the squared relative weight error of their plain
cuts, so that ``--allocate`` puts them into the budget too).

``layout`` says how the named weights are stored: ``"torch"``: (out, in),
``y = x Wᵀ`` (Hugging Face checkpoints); ``"flax"``: (in, out), ``y = x W``.
Either way the tensor is the (in, in) second moment of the layer's input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "jax_signedcut.calibration"
LAYOUTS = ("torch", "flax")
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Input second moments of a model's linear layers.

  Attributes:
    hessians: ``{weight name: H/N}``, each an (in, in) float32 symmetric PSD
      matrix (the mean of ``xᵀx`` over the calibration tokens).
    tokens: N, the number of calibration tokens (rows of X) behind them.
    layout: ``"flax"`` (weights named here are (in, out)) or ``"torch"``
      ((out, in)).
    means: optional ``{weight name: mean input (in,)}`` float32 (from
      :func:`calibrate`; the file format does not carry it). With it, the
      mean output shift of a compressed kernel can be folded into the bias:
      ``b' = b + meanᵀ (W − Ŵ)`` (see :func:`bias_correction`).
    sensitivities: optional ``{weight name: loss per unit of squared relative
      output error}`` (measured with the model, e.g.
      :func:`~jax_signedcut._calibration.allocate.measure_sensitivities`), for
      global bit allocation; the file carries it as the metadata field
      ``"sensitivities"`` (a JSON object).
    weight_sensitivities: optional ``{weight name: loss per unit of squared
      relative weight error ‖W − Ŵ‖² / ‖W‖²}`` for weights *without* statistics
      here (embedding tables: a lookup has no input second moment worth an
      (in, in) matrix), whose error curve is that of their plain cuts
      (:func:`~jax_signedcut._calibration.allocate.plain_curves`); with it the
      allocation spreads the bits over them too. The file carries it as the
      metadata field ``"weight_sensitivities"``.
  """

  hessians: Mapping[str, np.ndarray]
  tokens: int
  layout: str = "flax"
  means: Mapping[str, np.ndarray] | None = None
  sensitivities: Mapping[str, float] | None = None
  weight_sensitivities: Mapping[str, float] | None = None

  def for_weight(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The (in, in) matrix of weight ``name`` after checking it against the weight's ``shape``.

    Raises:
      KeyError: no statistics for ``name``.
      ValueError: ``shape`` is not 2-D or its input dim does not match.
    """
    if name not in self.hessians:
      raise KeyError(f"no calibration statistics for weight {name!r} "
                     f"(have {len(self.hessians)}: {sorted(self.hessians)[:4]}...)")
    h = self.hessians[name]
    if len(shape) != 2:
      raise ValueError(f"weight {name!r} must be 2-D to use calibration statistics, "
                       f"got shape {tuple(shape)}")
    fan_in = shape[1] if self.layout == "torch" else shape[0]
    if h.shape != (fan_in, fan_in):
      raise ValueError(
          f"calibration statistics for {name!r} have shape {h.shape}, but the weight "
          f"{tuple(shape)} in layout {self.layout!r} has {fan_in} inputs "
          f"(expected ({fan_in}, {fan_in}); wrong layout?)")
    return h


# ---------------------------------------------------------------------------------------------
# Accumulation.


def _masked_moment(x, mask, where):
  """(xᵀx, Σx, token count) of a layer input x (..., in), rows weighted by the token mask."""
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  if mask is None:
    return (jnp.matmul(x2.T, x2, precision=_HI), jnp.sum(x2, axis=0),
            jnp.float32(x2.shape[0]))
  if tuple(mask.shape) != tuple(x.shape[:-1]):
    raise ValueError(f"the token mask has shape {tuple(mask.shape)} but the input of {where} "
                     f"has shape {tuple(x.shape)}: the mask must match its leading dims")
  w = mask.reshape(-1).astype(jnp.float32)
  xw = x2.T * w[None, :]
  return jnp.matmul(xw, x2, precision=_HI), jnp.sum(xw, axis=1), jnp.sum(w)


def _add(record, name, moment):
  if name in record:  # a layer called twice per batch: both calls count
    moment = tuple(a + b for a, b in zip(record[name], moment))
  record[name] = moment


class _Accumulator:
  """Host-side float64 sums per weight name (bounded memory: one (in, in) per kernel)."""

  def __init__(self):
    self.sums: dict[str, np.ndarray] = {}
    self.firsts: dict[str, np.ndarray] = {}
    self.counts: dict[str, float] = {}

  def add(self, moments):
    for name, (h, first, n) in moments.items():
      h = np.asarray(h, np.float64)
      first = np.asarray(first, np.float64)
      if name in self.sums:
        self.sums[name] += h
        self.firsts[name] += first
        self.counts[name] += float(n)
      else:
        self.sums[name] = h.copy()
        self.firsts[name] = first.copy()
        self.counts[name] = float(n)

  def result(self, layout) -> Calibration:
    if not self.sums:
      raise ValueError("calibration saw no linear layer (no nnx.Linear / linen.Dense was called)")
    tokens = {int(round(n)) for n in self.counts.values()}
    if 0 in tokens:
      bad = [k for k, n in self.counts.items() if n == 0]
      raise ValueError(f"calibration saw zero tokens for {bad[:4]} (all masked, or no batches)")
    hess = {k: ((s + s.T) / (2 * self.counts[k])).astype(np.float32)
            for k, s in self.sums.items()}
    means = {k: (f / self.counts[k]).astype(np.float32) for k, f in self.firsts.items()}
    return Calibration(hessians=hess, tokens=min(tokens), layout=layout, means=means)


def _accumulate(step, batches, token_mask) -> Calibration:
  """Σ over batches of ``step(args, mask)`` (a dict of per-kernel moments), in float64."""
  acc = _Accumulator()
  seen = 0
  for batch in batches:
    args = batch if isinstance(batch, tuple) else (batch,)
    acc.add(step(args, None if token_mask is None else token_mask(batch)))
    seen += 1
  if not seen:
    raise ValueError("batches is empty: calibration needs at least one batch")
  return acc.result("flax")


def calibrate(model, batches: Iterable, *, token_mask: Callable | None = None) -> Calibration:
  """Runs a Flax NNX model over batches and accumulates H = Σ xᵀx for every ``nnx.Linear``.

  Each batch is one call ``model(*batch)`` (a non-tuple batch is one argument).
  Every call is jitted (one compilation per input shape) and only the (in, in)
  sums leave it; the host keeps one float64 sum per kernel.

  Args:
    model: an ``nnx.Module``; its ``nnx.Linear`` layers (at any depth) are measured.
      It is not modified.
    batches: an iterable of batches (tuples of positional arguments).
    token_mask: optional ``batch -> (...)`` array of 0/1 (or weights) over the
      leading dims of the linear inputs, e.g. ``lambda b: b[1]`` for BERT's
      attention mask: padding tokens get weight 0.

  Returns:
    A :class:`Calibration` keyed by kernel paths (``layers/0/query/kernel``),
    layout ``"flax"``.

  Raises:
    ValueError: no batch, no linear layer called, a mask that does not match an
      input, or zero tokens.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.a = nnx.Linear(3, 4, rngs=rngs)
    ...     self.b = nnx.Linear(4, 2, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.b(jnp.tanh(self.a(x)))
    >>> cal = calibrate(Net(nnx.Rngs(0)), [(jnp.ones((5, 3)),)])
    >>> cal.tokens, cal.hessians["a/kernel"].shape, cal.hessians["b/kernel"].shape
    (5, (3, 3), (4, 4))
  """
  from flax import nnx  # noqa: PLC0415

  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, args, mask):
    m = nnx.merge(graphdef, state)
    names = {id(mod): "/".join(map(str, path)) + "/kernel"
             for path, mod in nnx.iter_modules(m) if isinstance(mod, nnx.Linear)}
    record = {}
    original = nnx.Linear.__call__

    def recording_call(self, inputs, *a, **k):
      name = names.get(id(self))
      if name is not None:
        _add(record, name, _masked_moment(inputs, mask, name))
      return original(self, inputs, *a, **k)

    with _patched(nnx.Linear, "__call__", recording_call):
      m(*args)
    return record

  return _accumulate(lambda args, mask: step(state, args, mask), batches, token_mask)


def calibrate_linen(module, variables, batches: Iterable, *, token_mask: Callable | None = None,
                    method: Callable | str | None = None) -> Calibration:
  """The Linen twin of :func:`calibrate`: H = Σ xᵀx for every ``linen.Dense`` kernel.

  Args:
    module: a ``flax.linen.Module``.
    variables: its variables (``{"params": ...}``).
    batches: iterable of batches; each is ``module.apply(variables, *batch)``.
    token_mask: as in :func:`calibrate`.
    method: optional method to apply instead of ``__call__``.

  Returns:
    A :class:`Calibration` keyed by ``params/<module path>/kernel`` (the path of
    the kernel in ``variables``), layout ``"flax"``.

  Raises:
    ValueError: as :func:`calibrate`.
  """
  import flax.linen as nn  # noqa: PLC0415

  @jax.jit
  def step(variables, args, mask):
    record = {}

    def interceptor(next_fun, args_, kwargs_, context):
      if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
        name = "/".join(("params",) + tuple(context.module.path) + ("kernel",))
        _add(record, name, _masked_moment(args_[0], mask, name))
      return next_fun(*args_, **kwargs_)

    with nn.intercept_methods(interceptor):
      module.apply(variables, *args, method=method)
    return record

  return _accumulate(lambda args, mask: step(variables, args, mask), batches, token_mask)


@contextlib.contextmanager
def _patched(cls, name, fn):
  # Only active while the step is traced: the compiled program keeps the sums.
  original = getattr(cls, name)
  setattr(cls, name, fn)
  try:
    yield
  finally:
    setattr(cls, name, original)


# ---------------------------------------------------------------------------------------------
# File format.


def check_hessian(h, name: str = "H", *, where: str = "") -> np.ndarray:
  """Validates one second-moment matrix: square, finite, symmetric, positive semidefinite.

  Args:
    h: the (in, in) matrix.
    name: its name, for messages.
    where: a file name for messages.

  Returns:
    ``h`` as float32, exactly symmetrised.

  Raises:
    ValueError: not square 2-D, non-finite entries, asymmetric beyond rounding, or
      an eigenvalue below ``-1e-4 ×`` the largest (not PSD).
  """
  at = f"{where}: " if where else ""
  h = np.asarray(h)
  if h.ndim != 2 or h.shape[0] != h.shape[1]:
    raise ValueError(f"{at}calibration tensor {name!r} must be a square (in, in) matrix, "
                     f"got shape {h.shape}")
  if not np.issubdtype(h.dtype, np.floating):
    raise ValueError(f"{at}calibration tensor {name!r} must be float, got dtype {h.dtype}")
  h = h.astype(np.float64)
  if not np.isfinite(h).all():
    raise ValueError(f"{at}calibration tensor {name!r} has {int((~np.isfinite(h)).sum())} "
                     "non-finite entries")
  scale = max(float(np.max(np.abs(h))), 1e-30)
  asym = float(np.max(np.abs(h - h.T)))
  if asym > 1e-4 * scale:
    raise ValueError(f"{at}calibration tensor {name!r} is not symmetric "
                     f"(max |H - Hᵀ| = {asym:.3g}, max |H| = {scale:.3g})")
  h = (h + h.T) / 2
  # λ_min(H) ≥ −1e-4·scale iff H + 1e-4·scale·I has a Cholesky factor (up to the boundary);
  # the factorisation costs a fraction of eigvalsh (1536²: 0.1 s against 5 s on a loaded
  # 2-core machine), which is then only run to name the eigenvalue in the message.
  try:
    np.linalg.cholesky(h + 1e-4 * scale * np.eye(h.shape[0]))
    low = 0.0
  except np.linalg.LinAlgError:
    low = float(np.linalg.eigvalsh(h)[0])
  if low < -1e-4 * scale:
    raise ValueError(f"{at}calibration tensor {name!r} is not positive semidefinite "
                     f"(smallest eigenvalue {low:.3g}, max |H| = {scale:.3g})")
  return h.astype(np.float32)


def save_calibration(path: str | os.PathLike, cal: Calibration,
                     names: Mapping[str, str] | None = None, *, layout: str | None = None,
                     sensitivities: Mapping[str, float] | None = None,
                     weight_sensitivities: Mapping[str, float] | None = None) -> None:
  """Writes statistics in the calibration file format (see the module doc).

  Args:
    path: the ``.safetensors`` file to write.
    cal: the statistics.
    names: optional ``{name in cal: name in the file}`` (e.g. flax paths to
      Hugging Face weight names); names it does not list are written unchanged.
    layout: the file's layout; defaults to ``cal.layout``. It only declares how
      the named weights are stored (the matrices are the same).
    sensitivities: optional ``{name in cal: sensitivity}`` (default
      ``cal.sensitivities``), one finite number >= 0 per matrix, written as the
      metadata field ``"sensitivities"`` under the file's names.
    weight_sensitivities: optional ``{weight name: sensitivity}`` (default
      ``cal.weight_sensitivities``) for weights with no matrix in ``cal``,
      written as ``"weight_sensitivities"`` under the file's names.

  Raises:
    ValueError: a bad layout, zero tokens, a bad matrix, or bad sensitivities
      (non-finite, negative, missing for a matrix or naming none; a weight
      sensitivity for a weight that has a matrix).
  """
  from safetensors.numpy import save_file  # noqa: PLC0415

  layout = cal.layout if layout is None else layout
  _check_layout(layout)
  if int(cal.tokens) <= 0:
    raise ValueError(f"cal.tokens must be > 0, got {cal.tokens!r}")
  names = dict(names or {})
  tensors = {names.get(k, k): check_hessian(v, k) for k, v in cal.hessians.items()}
  metadata = {"format": FORMAT, "layout": layout, "tokens": str(int(cal.tokens))}
  sens = cal.sensitivities if sensitivities is None else sensitivities
  if sens is not None:
    from jax_signedcut._calibration import allocate as _allocate  # noqa: PLC0415
    sens = _allocate.check_sensitivities(sens, cal.hessians)
    metadata["sensitivities"] = json.dumps({names.get(k, k): v for k, v in sorted(sens.items())})
  wsens = cal.weight_sensitivities if weight_sensitivities is None else weight_sensitivities
  if wsens is not None:
    wsens = check_weight_sensitivities(wsens, cal.hessians)
    metadata["weight_sensitivities"] = json.dumps(
        {names.get(k, k): v for k, v in sorted(wsens.items())})
  save_file(tensors, os.fspath(path), metadata=metadata)


def check_weight_sensitivities(sensitivity: Mapping[str, float], hessians, *,
                               where: str = "") -> dict:
  """``{name: float}`` after checking: finite, >= 0, and no name that has statistics.

  Raises:
    ValueError: naming the offending names / values (and ``where``, e.g. a file).
  """
  from jax_signedcut._calibration import allocate as _allocate  # noqa: PLC0415

  at = f"{where}: " if where else ""
  both = sorted(set(sensitivity) & set(hessians))
  if both:
    raise ValueError(f"{at}weight sensitivities for {len(both)} weights with statistics: "
                     f"{both[:4]} (theirs belong in 'sensitivities', per unit of output error)")
  return _allocate.check_sensitivities(sensitivity, sensitivity, where=where)


def load_calibration(path: str | os.PathLike) -> Calibration:
  """Reads and validates a calibration file (see the module doc).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a calibration file (format tag), a bad layout or token
      count, or a tensor that is not a finite symmetric PSD (in, in) matrix —
      the message names the file and the tensor.
  """
  from safetensors import safe_open  # noqa: PLC0415

  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"calibration file {path!r} does not exist")
  try:
    with safe_open(path, framework="numpy") as fh:
      meta = fh.metadata() or {}
      tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
  except Exception as e:  # safetensors raises its own error types for corrupt headers
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: metadata 'format' must be {FORMAT!r}, got {meta.get('format')!r}")
  layout = meta.get("layout")
  if layout not in LAYOUTS:
    raise ValueError(f"{path}: metadata 'layout' must be one of {LAYOUTS}, got {layout!r}")
  try:
    tokens = int(meta.get("tokens", ""))
  except ValueError:
    tokens = -1
  if tokens <= 0:
    raise ValueError(f"{path}: metadata 'tokens' must be a positive integer, "
                     f"got {meta.get('tokens')!r}")
  if not tensors:
    raise ValueError(f"{path}: holds no tensors")
  hess = {k: check_hessian(v, k, where=path) for k, v in tensors.items()}
  sens = _json_field(meta, "sensitivities", path)
  if sens is not None:
    from jax_signedcut._calibration import allocate as _allocate  # noqa: PLC0415
    sens = _allocate.check_sensitivities(sens, hess, where=f"{path}: metadata 'sensitivities'")
  wsens = _json_field(meta, "weight_sensitivities", path)
  if wsens is not None:
    wsens = check_weight_sensitivities(wsens, hess,
                                       where=f"{path}: metadata 'weight_sensitivities'")
  return Calibration(hessians=hess, tokens=tokens, layout=layout, sensitivities=sens,
                     weight_sensitivities=wsens)


def _json_field(meta: Mapping[str, str], field: str, path) -> dict | None:
  """The JSON object in metadata ``field`` (None when absent); a clear error otherwise."""
  if field not in meta:
    return None
  try:
    value = json.loads(meta[field])
  except ValueError:
    value = None
  if not isinstance(value, dict):
    raise ValueError(f"{path}: metadata {field!r} must be a JSON object "
                     f"{{weight name: number >= 0}}, got {meta[field][:80]!r}")
  return value


def _check_layout(layout):
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def bias_correction(mean: np.ndarray | jax.Array, w: jax.Array, w_hat: jax.Array) -> jax.Array:
  """``meanᵀ (W − Ŵ)`` (out,): add it to the bias so that the mean output is kept exactly.

  ``‖X E‖² = N (‖meanᵀE‖² + tr(Eᵀ Σ E))`` with Σ the input covariance: the
  first term is the mean output shift, which a bias absorbs for free.
  """
  e = jnp.asarray(w, jnp.float32) - jnp.asarray(w_hat, jnp.float32)
  return jnp.matmul(jnp.asarray(mean, jnp.float32), e, precision=_HI)


def damped(h: np.ndarray | jax.Array, damp: float = 0.01) -> jax.Array:
  """``H + damp · mean(diag H) · I`` (float32): the usual GPTQ damping, so H is invertible.

  Raises:
    ValueError: ``damp`` < 0 or not finite.
  """
  if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
    raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
  h = jnp.asarray(h, jnp.float32)
  lam = damp * jnp.mean(jnp.diagonal(h))
  return h + lam * jnp.eye(h.shape[0], dtype=h.dtype)
