"""Peak memory of ``jax-signedcut compress`` on a checkpoint of several 4096x4096 matrices.

Writes a safetensors checkpoint of N f32 4096x4096 matrices (+ a bias each) in a
temporary directory, compresses it through the installed console script under
``/usr/bin/time -v`` and reports the maximum resident set size against

* the same-run baseline: the RSS of a process that only imports jax and
  jax_signedcut and runs one tiny decompose (the fixed cost of the runtime),
* one matrix's f32 size (64 MiB) and the target "3x one matrix + the kernel's
  working set".

The width is kept small (``--width 64`` by default) so that the run is quick:
the peak is set by the buffers of one matrix (input, the kernel's R and Rᵀ),
not by the number of cuts, whose factors take
``w*(m+n)/8`` bytes (64 KiB at w = 64). Matrices are read, compressed and
written one at a time, so the peak must not grow with N: the script also runs
N = 1 to show it.

Usage: python benchmarks/checkpoint_memory.py [--count 4] [--size 4096] [--width 64]
       [--dist normal|planted|t2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np


def max_rss_mib(cmd: list[str]) -> tuple[float, float]:
  """(max RSS in MiB, wall seconds) of a command under /usr/bin/time -v."""
  res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                       check=False)
  if res.returncode != 0:
    sys.exit(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
  rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
  wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", res.stderr)
  parts = [float(p) for p in wall.group(1).split(":")]
  seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
  return int(rss.group(1)) / 1024, seconds


def write_checkpoint(path: str, count: int, size: int, dist: str = "normal") -> None:
  from safetensors.numpy import save_file  # noqa: PLC0415

  rng = np.random.default_rng(0)
  tensors = {}
  for i in range(count):
    if dist == "t2":  # heavy tails: the 0.5 % cap of the outlier rule binds
      w = rng.standard_t(2, (size, size)).astype(np.float32)
    else:
      w = rng.standard_normal((size, size), dtype=np.float32)
      if dist == "planted":  # a few hundred huge entries: selected, under the cap
        w.reshape(-1)[rng.choice(w.size, 300, replace=False)] = 100.0
    tensors[f"layers.{i}.weight"] = w
    tensors[f"layers.{i}.bias"] = np.zeros(size, np.float32)
  save_file(tensors, path)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--count", type=int, default=4)
  p.add_argument("--size", type=int, default=4096)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--dist", choices=("normal", "planted", "t2"), default="normal",
                 help="entries: Gaussian (auto selects none), Gaussian with 300 planted "
                 "outliers, or Student-t with 2 degrees of freedom (auto hits its 0.5 %% cap)")
  args = p.parse_args()
  if not os.path.exists("/usr/bin/time"):
    sys.exit("needs GNU time: apt-get install -y time")
  exe = shutil.which("jax-signedcut", path=os.path.dirname(sys.executable)) or \
      shutil.which("jax-signedcut")
  if exe is None:
    sys.exit("the jax-signedcut console script is not installed (pip install -e .)")
  matrix_mib = args.size * args.size * 4 / 2**20
  with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
    baseline, _ = max_rss_mib([sys.executable, "-c",
                               "import jax, jax_signedcut as sc;"
                               "sc.decompose(jax.numpy.ones((32, 32)), key=jax.random.key(0),"
                               " width=4, outliers=0).c.block_until_ready()"])
    rows = []
    for count in sorted({1, args.count}):
      src = os.path.join(d, f"in{count}.safetensors")
      write_checkpoint(src, count, args.size, args.dist)
      for outliers in ("auto", "0"):
        rss, wall = max_rss_mib([exe, "compress", src, os.path.join(d, "out.safetensors"),
                                 "--width", str(args.width), "--outliers", outliers, "-q"])
        rows.append((count, outliers, rss, wall))
      os.unlink(src)
  print(f"jax-signedcut compress --width {args.width}: {args.size}x{args.size} f32 matrices "
        f"({matrix_mib:.0f} MiB each, {args.dist} entries); baseline process (import jax + "
        f"jax_signedcut, one tiny decompose): {baseline:.0f} MiB max RSS")
  header = ("matrices", "outliers", "max RSS MiB", "minus baseline", "in matrices",
            "wall s")
  print("  ".join(f"{h:>14}" for h in header))
  for count, outliers, rss, wall in rows:
    extra = rss - baseline
    print("  ".join(f"{v:>14}" for v in (count, outliers, f"{rss:.0f}", f"{extra:.0f}",
                                          f"{extra / matrix_mib:.2f}x", f"{wall:.1f}")))
  print(f"target: 3x one matrix = {3 * matrix_mib:.0f} MiB above the baseline, plus the "
        "kernel's working set")


if __name__ == "__main__":
  main()
