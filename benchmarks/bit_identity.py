"""Are this tree's decompose factors bit-identical to another checkout's (e.g. the previous release)?

    git worktree add /tmp/old <commit>      # and copy or build its extension there
    python benchmarks/bit_identity.py --old /tmp/old

Runs the same cases (rates, bits, widths with max_error, outliers, a low-rank part,
batches, the jnp backend, the leaf-by-leaf path) in both and compares every factor
array byte for byte, plus the relative error and nbytes.
"""
import argparse, sys, subprocess, json, os
CASES = [
  dict(shape=(64, 48), kw=dict(rate=0.5)),
  dict(shape=(100, 77), kw=dict(bits_per_weight=3, outliers=0)),
  dict(shape=(96, 64), kw=dict(bits_per_weight=4, lowrank=4), heavy=True),
  dict(shape=(90, 70), kw=dict(width=60, max_error=0.3), heavy=True),
  dict(shape=(3, 40, 33), kw=dict(bits_per_weight=5), heavy=True),
  dict(shape=(80, 80), kw=dict(rate=0.25, outliers=0.01, backend="jnp")),
  dict(shape=(70, 50), kw=dict(width=40, lowrank=3, max_error=0.1, outliers=0.005), heavy=True),
]
CODE = r'''
import sys, json, numpy as np, jax, jax.numpy as jnp
old = sys.argv[1] == "old"
if old:
  sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower() and "Editable" not in type(f).__name__]
  sys.path.insert(0, sys.argv[3])
import jax_signedcut as sc
assert (sys.argv[3] in sc.__file__) == old, sc.__file__
cases = json.loads(sys.argv[2]); out = {}
for i, c in enumerate(cases):
  a = np.array(jax.random.normal(jax.random.key(i), c["shape"]), np.float32)
  if c.get("heavy"):
    a.reshape(-1)[:: max(1, a.size // 7)] = 50.0
  for leafwise in (False, True):
    if leafwise:
      f = sc.decompose_leafwise({"w": a}, key=jax.random.key(3), progress=False, **c["kw"])["w"]
    else:
      f = sc.decompose(a, key=jax.random.key(3), **c["kw"])
    if old:
      d = dict(s=f.s_bits, t=f.t_bits, c=f.c, n=f.num_cuts)
      if f.sparse_idx is not None: d.update(si=f.sparse_idx, sv=f.sparse_val, sn=f.num_sparse)
      if f.lr_u is not None: d.update(u=f.lr_u.astype(jnp.float32), v=f.lr_v.astype(jnp.float32))
      err = float(np.max(np.asarray(sc.relative_error(a, f)))); nb = sc.nbytes(f)
    else:
      cuts = f if isinstance(f, sc.SignedCut) else f.part(sc.SignedCut)
      d = dict(s=cuts.s_bits, t=cuts.t_bits, c=cuts.c, n=cuts.num_cuts)
      sp = None if isinstance(f, sc.SignedCut) else f.part(sc.Sparse)
      lr = None if isinstance(f, sc.SignedCut) else f.part(sc.LowRankPart)
      if sp is not None: d.update(si=sp.idx, sv=sp.val, sn=sp.count)
      if lr is not None: d.update(u=lr.u.astype(jnp.float32), v=lr.v.astype(jnp.float32))
      err = float(np.max(np.asarray(sc.relative_error(a, f)))); nb = sc.nbytes(f)
    out[f"{i}/{leafwise}"] = dict({k: np.asarray(v).tobytes().hex() for k, v in d.items()}, err=err, nbytes=nb)
print(json.dumps(out))
'''
p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--old", required=True, help="the other checkout (its jax_signedcut/ holds a built extension)")
args = p.parse_args()
res = {}
for side in ("old", "new"):
  r = subprocess.run([sys.executable, "-c", CODE, side, json.dumps(CASES), os.path.abspath(args.old)],
                     capture_output=True, text=True,
                     cwd="/tmp", env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if r.returncode:
    print(side, r.stderr[-3000:]); sys.exit(1)
  res[side] = json.loads(r.stdout.strip().splitlines()[-1])
bad = 0
for k in res["old"]:
  o, n = res["old"][k], res["new"][k]
  same = o == n
  bad += not same
  print(f"case {k:8s} {'bit-identical' if same else 'DIFFERENT ' + str([x for x in o if o[x] != n.get(x)])}  err {o['err']:.5f} / {n['err']:.5f}  nbytes {o['nbytes']} / {n['nbytes']}")
print("different:", bad, "of", len(res["old"]))
