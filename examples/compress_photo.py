"""Compress a colour photograph with signed cuts, LPLR, DSVD and RTN at equal bytes.

The image is scikit-image's ``chelsea`` (a cat, shipped inside the wheel),
scaled to [0, 1] and viewed as a (3, H, W) array. Methods:

* tensor cuts   — one order-3 signed cut decomposition of the (3, H, W) tensor
                  (``decompose_tensor``);
* matrix cuts   — the three colour planes as a stacked batch of H×W matrices
                  (``decompose``, one width per plane);
* LPLR, DSVD    — rank from the budget, 8-bit factors, per-column scales;
* RTN           — per-row round-to-nearest at 1, 2, 4 and 8 bits per value.

Greedy cuts are prefix-consistent, so each cut method runs once at the
largest width and the smaller rates are truncations. Output (in the
directory given on the command line, default ``out/``): ``photo_grid.png``
(images side by side, one row per rate), ``photo_error_vs_bytes.png`` and a
printed table. Runs in well under two minutes on 2 CPU cores at the default
half resolution (150×225).

    pip install -e ".[examples]"
    python examples/compress_photo.py out/
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_signedcut as jsc

RATES = (0.25, 0.5, 1.0, 2.0)       # bits per value (pixel·channel)
RTN_BITS = (1, 2, 4, 8)


def load_image(downscale: int) -> np.ndarray:
  from skimage import data  # noqa: PLC0415  (optional dependency: the "examples" extra)
  img = data.chelsea().astype(np.float32) / 255.0                  # (H, W, 3)
  if downscale > 1:
    h, w = (s // downscale * downscale for s in img.shape[:2])
    img = img[:h, :w].reshape(h // downscale, downscale, w // downscale, downscale, 3)
    img = img.mean(axis=(1, 3))
  return np.ascontiguousarray(img.transpose(2, 0, 1))               # (3, H, W)


def rel_error(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def psnr(a, b):
  return float(10 * np.log10(1.0 / np.mean((np.clip(b, 0, 1) - a) ** 2)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("out", nargs="?", default="out", help="output directory (default out/)")
  parser.add_argument("--downscale", type=int, default=2,
                      help="average-pool the 300x451 image by this factor (1 = full size)")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)

  img = load_image(args.downscale)
  c, h, w = img.shape
  n_values = img.size
  a = jnp.asarray(img)
  key = jax.random.key(0)
  print(f"image (3, {h}, {w}): {n_values} values, {n_values} bytes as uint8")

  results = []   # (method, label, bytes, reconstruction)

  t0 = time.perf_counter()
  per_cut = jsc.tensor_bytes_per_cut(img.shape)
  widths = [int(r * n_values / 8 // per_cut) for r in RATES]
  ft = jsc.decompose_tensor(a, key=key, width=max(widths))
  for r, k in zip(RATES, widths):
    sub = jsc.SignedTensorCut(bits=tuple(b[:k] for b in ft.bits), c=ft.c[:k],
                              num_cuts=jnp.minimum(ft.num_cuts, k), shape=ft.shape)
    results.append(("tensor cuts", r, sub.nbytes, np.asarray(jsc.reconstruct_tensor(sub))))
  t_tensor = time.perf_counter() - t0

  t0 = time.perf_counter()
  mat_bytes = 4 * (-(-h // 32) + -(-w // 32)) + 4                  # per cut of one plane
  widths = [max(1, int(r * h * w / 8 // mat_bytes)) for r in RATES]
  fm = jsc.decompose(a, key=key, width=max(widths))
  for r, k in zip(RATES, widths):
    sub = jsc.truncate(fm, k)
    results.append(("matrix cuts", r, jsc.nbytes(sub), np.asarray(jsc.reconstruct(sub))))
  t_matrix = time.perf_counter() - t0

  t0 = time.perf_counter()
  for name, fn in (("LPLR", jsc.lplr), ("DSVD", jsc.dsvd)):
    for r in RATES:
      kw = dict(key=key) if name == "LPLR" else {}
      try:
        f = fn(a, bits_per_weight=r, bits=(8, 8), scale="per_column", **kw)
      except ValueError:          # the budget does not pay for one component
        continue
      results.append((name, r, f.nbytes, np.asarray(jsc.reconstruct_lowrank(f))))
  for b in RTN_BITS:
    q = jsc.rtn(a, bits=b, grid="uniform")
    results.append(("RTN", b, q.nbytes, np.asarray(jsc.dequantize_matrix(q))))
  t_other = time.perf_counter() - t0

  print(f"time: tensor cuts {t_tensor:.1f}s, matrix cuts {t_matrix:.1f}s, "
        f"LPLR+DSVD+RTN {t_other:.1f}s")
  print(f"{'method':<12} {'rate':>6} {'bytes':>8} {'bits/value':>10} {'rel. error':>10} "
        f"{'PSNR dB':>8}")
  for name, r, nb, rec in results:
    print(f"{name:<12} {r:>6g} {nb:>8d} {8 * nb / n_values:>10.3f} {rel_error(img, rec):>10.4f} "
          f"{psnr(img, rec):>8.2f}")

  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  methods = ["tensor cuts", "matrix cuts", "LPLR", "DSVD", "RTN"]
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for m in methods:
    pts = [(nb, rel_error(img, rec)) for name, _, nb, rec in results if name == m]
    ax.plot(*zip(*pts), marker="o", label=m)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("stored bytes")
  ax.set_ylabel("relative Frobenius error")
  ax.set_title(f"chelsea ({h}x{w}x3): error vs bytes")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "photo_error_vs_bytes.png"), dpi=120)

  cut_methods = methods[:4]
  fig, axes = plt.subplots(len(RATES), len(cut_methods) + 1,
                           figsize=(2.6 * (len(cut_methods) + 1), 2.0 * len(RATES)))
  for i, r in enumerate(RATES):
    axes[i, 0].imshow(img.transpose(1, 2, 0))
    axes[i, 0].set_title("original" if i == 0 else "", fontsize=8)
    axes[i, 0].set_ylabel(f"{r:g} bits/value", fontsize=8)
    for j, m in enumerate(cut_methods):
      hit = [(nb, rec) for name, rr, nb, rec in results if name == m and rr == r]
      ax = axes[i, j + 1]
      if hit:
        nb, rec = hit[0]
        ax.imshow(np.clip(rec, 0, 1).transpose(1, 2, 0))
        ax.set_title(f"{m}: {nb} B, {psnr(img, rec):.1f} dB", fontsize=7)
    for ax in axes[i]:
      ax.set_xticks([])
      ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "photo_grid.png"), dpi=110)
  print(f"wrote {args.out}/photo_grid.png and {args.out}/photo_error_vs_bytes.png")


if __name__ == "__main__":
  main()
