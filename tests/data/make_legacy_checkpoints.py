"""Writes the format version 1 and 2 fixtures with the release that wrote those versions.

Run it with that release's ``jax_signedcut`` imported instead of this one's
(see README.md here for the command).

It writes ``legacy_v1.safetensors``, ``legacy_v2.safetensors`` and
``legacy_expected.npz``: every field of every signed cut leaf
(``<file>:<leaf>.<field>``) and every array leaf (``<file>:<leaf>.array``), as
the old release held them in memory.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_signedcut as sc

FIELDS = ("s_bits", "t_bits", "c", "num_cuts", "sparse_idx", "sparse_val", "num_sparse",
          "lr_u", "lr_v")


def heavy(key, shape, planted=4):
  a = jax.random.normal(key, shape)
  idx = jax.random.choice(jax.random.fold_in(key, 1), a.size, (planted,), replace=False)
  return a.reshape(-1).at[idx].set(60.0).reshape(shape)


def main(out):
  assert "sparse_idx" in sc.SignedCut.__dataclass_fields__, \
      "run this with the release that wrote format versions 1 and 2 (see README.md)"
  k = jax.random.key(0)
  v1 = {
      # cuts only, a batch of 2 stopped early by max_error: trimmed slots on disk
      "cuts": sc.decompose(jax.random.normal(k, (2, 20, 36)), key=jax.random.key(1), width=40,
                           max_error=0.5, outliers=0),
      # cuts and sparse entries (planted outliers), rate budget
      "layer": [{"w": sc.decompose(heavy(jax.random.key(2), (24, 40)), key=jax.random.key(3),
                                   rate=0.25),
                 "b": jnp.arange(4.0, dtype=jnp.bfloat16)}],
      # sparse part with no entry found: slots but nothing stored
      "empty_sparse": sc.decompose(jax.random.normal(jax.random.key(4), (16, 16)),
                                   key=jax.random.key(5), width=3, outliers="auto"),
      "step": np.int64(3),
  }
  v2 = {
      # low rank + cuts + sparse
      "pos": sc.decompose(heavy(jax.random.key(6), (32, 24)), key=jax.random.key(7),
                          bits_per_weight=4, lowrank=2),
      # low rank + cuts, a batch of 2
      "lr": sc.decompose(jax.random.normal(jax.random.key(8), (2, 18, 20)),
                         key=jax.random.key(9), rate=0.5, lowrank=1, outliers=0),
      "bias": jnp.ones(3, jnp.float32),
  }
  sc.save(os.path.join(out, "legacy_v1.safetensors"), v1, metadata={"fixture": "v1"})
  sc.save(os.path.join(out, "legacy_v2.safetensors"), v2, metadata={"fixture": "v2"})
  expected = {}
  for name, tree in (("v1", v1), ("v2", v2)):
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, sc.SignedCut))[0]
    for kp, leaf in flat:
      path = name + ":" + "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in kp)
      if isinstance(leaf, sc.SignedCut):
        for f in FIELDS:
          if getattr(leaf, f) is not None:
            a = np.asarray(getattr(leaf, f))
            # npz has no bfloat16: bf16 arrays are kept as (exact) float32.
            expected[f"{path}.{f}"] = a.astype(np.float32) if a.dtype == jnp.bfloat16 else a
      else:
        a = np.asarray(leaf)
        expected[f"{path}.array"] = a.astype(np.float32) if a.dtype == jnp.bfloat16 else a
  np.savez_compressed(os.path.join(out, "legacy_expected.npz"), **expected)
  for f in sorted(os.listdir(out)):
    print(f, os.path.getsize(os.path.join(out, f)))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(__file__))
