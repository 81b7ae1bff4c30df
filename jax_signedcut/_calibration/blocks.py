"""The calibrated block search: GPTQ's error feedback with signed cuts on blocks of inputs.

GPTQ rounds a kernel's input channels one at a time and pushes each rounding
error onto the channels not yet rounded, where the later channels can cancel
it on the calibration inputs. Cuts span every input row, so this module does it
for blocks of rows. For a Flax kernel ``W`` (in, out) with input second moment
``H``, the output error ``tr(EᵀHE)`` splits exactly when the rows are cut
into a block B and the rows R after it::

  tr(EᵀHE) = tr(E_Bᵀ (H_BB − H_BR H_RR⁻¹ H_RB) E_B) + tr(E'_Rᵀ H_RR E'_R),

where ``E'_R`` is the error of R against the *updated* target
``W_R + H_RR⁻¹ H_RB E_B`` (the rows after B take over what B got wrong, as far
as the inputs let them). So block B is compressed under the Schur complement
``H_BB − H_BR H_RR⁻¹ H_RB``, its error is pushed onto R, and R is compressed
the same way, block by block. The input rows are taken in order of falling
``diag(H)`` (GPTQ's "act order": the busiest inputs first, their errors
absorbed by the rest), in ``blocks`` equal parts, each part with the
calibrated cuts of :mod:`jax_signedcut._calibration.cuts` (input scales, cuts,
sparse part, refit) at the same bits per weight. The result is a
:class:`~jax_signedcut.RowBlocks` (the permutation costs 4 bytes per row,
paid from the budget).

Blocks trade the cuts' sharing of one sign vector over all rows (each block's
cuts are shorter, so more of them are paid for, but each sees fewer rows)
against the error feedback. On MiniLM at 4 bits (docs/calibration.md) two
blocks lower the output error of the 384×384 kernels by 5–15 % and four
blocks that of the 1536×384 FFN output kernels by 30–40 %, below GPTQ int4's
on some; more blocks lose on the square kernels.

Not prefix-consistent: each block's target depends on the blocks before it at
the same budget, so every budget is its own run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._parts.blocks import RowBlocks

#: Ridge added to H for the Schur complements and the error feedback, relative to mean(diag H)
#: (GPTQ's default damping; it keeps the feedback from leaning on directions the few
#: calibration tokens barely see).
DAMP = 0.01


def block_rows(m: int, blocks: int) -> list[tuple[int, int]]:
  """``[(lo, hi)]``: ``blocks`` consecutive ranges of 0..m−1, sizes differing by at most one."""
  edges = [b * m // blocks for b in range(blocks + 1)]
  return list(zip(edges[:-1], edges[1:]))


def act_order(h) -> np.ndarray:
  """Input rows by falling ``diag(H)`` (ties in index order): int32 (m,)."""
  return np.argsort(-np.diagonal(np.asarray(h, np.float64)), kind="stable").astype(np.int32)


def blocked_signed_cut(a, h, *, key, bits_per_weight: float, options: dict, outliers="auto",
                       path: str = "") -> RowBlocks:
  """Calibrated signed cuts of kernel ``a`` (in, out) in ``options["blocks"]`` row blocks.

  Args:
    a: float (m, n) kernel, Flax layout.
    h: (m, m) input second moment (checked by the caller).
    key: the kernel's key; block b uses ``jax.random.fold_in(key, b)``.
    bits_per_weight: the whole kernel's budget. The permutation's 4 bytes per
      row come first; each block then gets its rows' share of the bytes left
      (what a block's whole cuts leave over goes to the blocks after it).
    options: checked signed-cut options (``api.check_options``); each block is
      compressed by ``api.signed_cut`` with them and ``blocks=1`` (so with
      ``fallback`` a block keeps plain cuts where those do better under its
      metric).
    outliers: the plain alternative's ``outliers``.
    path: the leaf's name, for messages.

  Returns:
    ``RowBlocks(perm, parts)`` within ``bits_per_weight · m·n / 8`` bytes.

  Raises:
    ValueError: more blocks than rows, or a budget that pays for no cut in a block.
  """
  from jax_signedcut._calibration import api as _api  # noqa: PLC0415

  w = np.asarray(a, np.float64)
  m, n = w.shape
  blocks = int(options["blocks"])
  where = _api._where(path)  # noqa: SLF001
  if blocks > m:
    raise ValueError(f"{where}: blocks={blocks} exceeds the {m} input rows of shape {(m, n)}")
  left = bits_per_weight * m * n / 8 - 4 * m      # bytes for the blocks after the permutation
  if left <= 0:
    raise ValueError(f"{where}: bits_per_weight={bits_per_weight:g} does not pay for the "
                     f"row permutation of {blocks} blocks ({4 * m} bytes)")
  perm = act_order(h)
  hp = np.asarray(h, np.float64)[np.ix_(perm, perm)]
  hp = (hp + hp.T) / 2 + DAMP * np.mean(np.diagonal(hp)) * np.eye(m)
  target = w[perm]
  inner = {**options, "blocks": 1}
  parts = []
  for b, (lo, hi) in enumerate(block_rows(m, blocks)):
    metric = hp[lo:hi, lo:hi]
    feed = None
    if hi < m:
      feed = np.linalg.solve(hp[hi:, hi:], hp[hi:, lo:hi])   # H_RR⁻¹ H_RB
      metric = metric - hp[lo:hi, hi:] @ feed
    metric = (metric + metric.T) / 2
    # This block's share of the bytes left (what earlier blocks' whole cuts left over
    # goes to the later ones).
    bits = left * (hi - lo) / (m - lo) * 8 / ((hi - lo) * n)
    try:
      part = _api.signed_cut(jnp.asarray(target[lo:hi], jnp.float32),
                             jnp.asarray(metric, jnp.float32), key=jax.random.fold_in(key, b),
                             bits_per_weight=bits, options=inner, outliers=outliers)
    except ValueError as e:
      raise ValueError(f"{where}: blocks={blocks} on shape {(m, n)}: block {b} (rows "
                       f"{lo}:{hi} in act order) cannot be compressed: {e}") from None
    parts.append(part)
    left -= part.nbytes
    if feed is not None:
      err = target[lo:hi] - np.asarray(part.reconstruct(), np.float64)
      target[hi:] = target[hi:] + feed @ err
  return RowBlocks(jnp.asarray(perm, jnp.int32), tuple(parts))
