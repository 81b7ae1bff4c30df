"""The ``jax-signedcut`` command: compress, expand and inspect checkpoints.

Run ``jax-signedcut --help`` (or ``python -m jax_signedcut._cli --help``).
:func:`main` takes an argv list and returns the exit status, so it can be
called in-process.
"""

from __future__ import annotations

import argparse
import signal
import sys

from jax_signedcut._cli import distributed as _distributed
from jax_signedcut._cli import expand as _expand
from jax_signedcut._cli import inspect as _inspect
from jax_signedcut._cli import interrupts as _interrupts
from jax_signedcut._cli.args import (
  CliError,
  Parser,
  lowrank_arg,
  method_arg,
  option_arg,
  outliers_arg,
  positive,
  rule_arg,
)
from jax_signedcut._cli.expand import dtype_arg

EPILOG_MAIN = """\
examples:
  # compress every 2-D weight to half the size of its bf16 copy
  jax-signedcut compress model.safetensors model.sc.safetensors --rate 0.5

  # 4 bits per weight, attention projections at 8, embeddings kept dense
  jax-signedcut compress model.safetensors out.safetensors --bits 4 \\
      --rule 'attention=bits=8' --skip 'embed'

  # round to nearest at 4 bits per weight (codes and their scales), or LPLR
  jax-signedcut compress model.safetensors rtn.safetensors --method rtn --bits 4.5
  jax-signedcut compress model.safetensors lplr.safetensors --method lplr --bits 2 \
      --option bits=8:8

  # a dense checkpoint back (bf16), and a look at what was done
  jax-signedcut expand out.safetensors dense.safetensors --dtype bf16
  jax-signedcut inspect out.safetensors --original model.safetensors

Run 'jax-signedcut COMMAND --help' for the options of a command.
"""

EPILOG_COMPRESS = """\
budgets:
  Each selected matrix A (m x n) is stored as w signed cuts A ~ S diag(c) T^T
  (S, T are +-1 sign matrices packed 32 to a word). The budget fixes w:
    --rate R        storage = R x the bf16 size (2 bytes per weight); 0.5 halves it
    --bits B        storage = B bits per weight (--rate 0.5 == --bits 8)
    --width W       exactly W cuts per matrix
    --max-error E   stop once the relative Frobenius error is <= E
                    (capped by --rate/--bits/--width if given, else by rate 1)
  --rule REGEX=BUDGET picks a budget per leaf: the first rule whose regex
  matches (re.search) the leaf's name wins. BUDGET is one of
    rate=0.25   bits=4   width=128   max_error=0.05   dense
  or several joined by commas (e.g. 'rate=0.5,max_error=0.01,outliers=0';
  'pos=bits=2,lowrank=16' adds a rank-16 bf16 part paid from the budget).
  Leaves no rule matches get the default budget (--rate/--bits/--width/
  --max-error); without one they are kept as they are.

methods:
  --method picks what spends the budget (default signed_cut):
    signed_cut   the cuts above (+ sparse entries, + an optional low-rank part)
    rtn          round to nearest int-b codes with f32 scales per row (or group)
    lplr         LPLR: randomized low-rank factors with quantized entries
    dsvd         truncated SVD factors, quantized
    lp_lowrank   robust l_p low-rank factors (float32)
    gptq         GPTQ int-b codes with f32 scales, calibrated (needs --calibration)
  Bits per weight is the common currency: --bits B is what a matrix may store
  in all, scales and padding included (rtn at --bits 4 keeps 3-bit codes when
  4-bit codes and their row scales would exceed 4; --rate R is --bits 16R).
  The other methods take --rate or --bits only; their own settings are
  --option KEY=VALUE (repeatable; a tuple is 8:4), e.g. --option group_size=64
  for rtn, --option bits=4:4 for lplr/dsvd, --option p=1.5 for lp_lowrank.
  A rule may switch the method of the leaves it matches:
    'mlp=bits=4,method=rtn,option.group_size=64'

calibration:
  --calibration STATS names, per weight of IN, the second moment H = X^T X / N
  of the inputs that layer sees (a safetensors file with metadata format
  'jax_signedcut.calibration', layout torch (weights (out, in), Hugging Face)
  or flax ((in, out)); docs/calibration.md). Those weights are compressed to
  minimise the error on their outputs: signed cuts with input scales, H-aware
  cuts and a least-squares refit (plain cuts kept where they do better;
  --option sparse_fraction=0.005 adds a sparse part chosen by output impact,
  --option fallback=false drops the plain alternative, --option blocks=2
  compresses the inputs in 2 blocks with GPTQ-style error feedback), or
  --method gptq.
  Weights the file does not name are compressed as without it.
  --allocate spreads the bits of the signed cut leaves the file names (their
  total stays within the budget) over budget-1, budget, budget+1 bits per
  weight: each leaf's output error at those budgets is measured under its H,
  weighted by the leaf's sensitivity (the model's loss per unit of that error),
  and the weighted sum minimised. The CLI has no model to measure
  sensitivities with: they come from STATS (metadata field 'sensitivities',
  written by save_calibration(..., sensitivities=...); docs/calibration.md).
  Leaves without statistics that STATS gives a 'weight_sensitivities' entry
  (embedding tables: loss per unit of squared relative weight error) share
  the budget too, by the weight error of their plain cuts. With
  --allocate-gptq a leaf with statistics may instead take GPTQ int-b codes
  (b the integers among those budgets, at their stored bits with scales) where
  they cost less output error per bit: the method is chosen per leaf with its
  bits (docs/calibration.md section 13).
  The allocation is printed and kept in OUT's metadata.
    jax-signedcut compress model.safetensors out.safetensors --bits 4 \\
        --calibration model.calib.safetensors

what is compressed:
  Float leaves with ndim >= 2 whose last two dims are both >= --min-dim
  (16); leading dims (stacked layers) are compressed as a batch. 1-D leaves
  (biases, norm scales), integer leaves and leaves matching --skip are copied
  unchanged.

  Outliers: by default ('auto') the few entries more than 6 robust standard
  deviations from the median (at most 0.5 %) are stored apart (8 bytes each,
  paid from the same budget); Gaussian-like matrices get none.

inputs and outputs:
  IN is a .safetensors file, a directory of .safetensors shards, or an orbax
  checkpoint directory. OUT is a .safetensors file (jax_signedcut format,
  readable with jax_signedcut.load). Matrices are read, compressed and
  written one at a time, so memory stays near one matrix's working set (an
  orbax input leaf by leaf too). The output appears only when complete
  (written to a temporary name beside it, fsynced, renamed); a run killed
  outright leaves only .OUT.*.tmp files, which the next run writing OUT
  removes. While a run writes OUT (lock file .OUT.lock), a second run
  writing the same OUT fails at once. Ctrl-C ends a run with one line and
  exit status 130.

examples:
  jax-signedcut compress model.safetensors out.safetensors --rate 0.5
  jax-signedcut compress ckpt_dir/ out.safetensors --bits 4 --rule 'mlp=bits=2' \\
      --rule 'lm_head=dense' --seed 1
  jax-signedcut compress model.safetensors out.safetensors --max-error 0.05 --rate 1
"""

EPILOG_EXPAND = """\
OUT ending in .safetensors gets a plain safetensors file whose tensor names
are the leaf names; any other OUT is written as an orbax checkpoint directory
(nested like the compressed tree). Leaves that were kept dense are copied
with their own dtype. Every method's leaves are expanded; --truncate-rate and
--truncate-bits first cut the signed cut leaves (greedy cuts are prefix-
consistent: the same as compressing at the lower budget) and leave the other
methods' leaves as they were stored.

examples:
  jax-signedcut expand out.safetensors dense.safetensors --dtype bf16
  jax-signedcut expand out.safetensors dense_ckpt/ --dtype f32
  jax-signedcut expand out.safetensors quarter.safetensors --truncate-rate 0.25
"""

EPILOG_INSPECT = """\
Columns: leaf name, shape, stored as (the method and what it stored: cuts
used/slots, sparse entries, a low-rank part, code bits, a factorization's rank),
bytes before (the source dtype) and after, bits per weight, and the relative
Frobenius error: as measured when compressing (from the greedy's own
bookkeeping for cuts), or measured against the original checkpoint with
--original (leaves it does not hold keep their estimate, marked *). A line
under the table says which.

examples:
  jax-signedcut inspect out.safetensors
  jax-signedcut inspect out.safetensors --original model.safetensors
"""


def build_parser() -> argparse.ArgumentParser:
  p = Parser(prog="jax-signedcut",
              description="Compress model checkpoints with 1-bit signed cut decompositions "
              "(A ~ S diag(c) T^T with +-1 matrices S, T) or another method (RTN, LPLR, DSVD, "
              "lp low rank), expand them back, inspect them.",
              epilog=EPILOG_MAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
  sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
  sub.required = True

  c = sub.add_parser("compress", help="compress a dense checkpoint",
                     description="Compress the matrices of a dense checkpoint (signed cuts by "
                     "default, or --method).",
                     epilog=EPILOG_COMPRESS, formatter_class=argparse.RawDescriptionHelpFormatter)
  c.add_argument("input", metavar="IN", help=".safetensors file, directory of shards, or orbax "
                 "checkpoint directory")
  c.add_argument("output", metavar="OUT", help="output .safetensors file (a directory with "
                 "--distributed)")
  g = c.add_mutually_exclusive_group()
  g.add_argument("--rate", type=positive("rate"), metavar="R",
                 help="default budget: fraction of the bf16 size (0.5 = half)")
  g.add_argument("--bits", type=positive("bits"), metavar="B",
                 help="default budget: bits per weight")
  g.add_argument("--width", type=positive("width"), metavar="W",
                 help="default budget: number of cuts per matrix")
  c.add_argument("--max-error", type=positive("max-error"), metavar="E",
                 help="stop a matrix once its relative error is <= E")
  c.add_argument("--rule", action="append", type=rule_arg, metavar="REGEX=BUDGET",
                 help="per-leaf budget, first match wins (repeatable; see below)")
  c.add_argument("--skip", action="append", metavar="REGEX",
                 help="keep dense every leaf whose name matches REGEX (repeatable)")
  c.add_argument("--seed", type=int, default=0, metavar="N", help="random seed of the cuts (default 0)")
  c.add_argument("--outliers", type=outliers_arg, default="auto", metavar="auto|0|FRACTION",
                 help="entries stored apart (default auto)")
  c.add_argument("--lowrank", type=lowrank_arg, default=0, metavar="R|auto",
                 help="rank of a bf16 low-rank part paid from the budget (default 0: none; "
                 "auto: the best of 0, 4, 8, 16, 32 per matrix, one decomposition each)")
  c.add_argument("--method", type=method_arg, default="signed_cut", metavar="NAME",
                 help="signed_cut (default), rtn, lplr, dsvd or lp_lowrank (see below)")
  c.add_argument("--option", action="append", type=option_arg, metavar="KEY=VALUE",
                 help="an option of --method (repeatable; see below)")
  c.add_argument("--calibration", metavar="STATS",
                 help="input statistics (a jax_signedcut.calibration safetensors file): the "
                 "leaves they name are compressed for their outputs (see below)")
  c.add_argument("--allocate", action="store_true",
                 help="with --calibration: spread the signed cut leaves' total bits by the "
                 "sensitivities in STATS (see below)")
  c.add_argument("--allocate-gptq", action="store_true",
                 help="with --allocate: a leaf with statistics may take GPTQ int-b codes "
                 "instead of cuts where they cost less output error per bit (see below)")
  c.add_argument("--min-dim", type=int, default=16, metavar="N",
                 help="compress only matrices with both dims >= N (default 16)")
  c.add_argument("--backend", default="auto", choices=("auto", "jnp", "ffi"),
                 help=argparse.SUPPRESS)
  c.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
  c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                 help="show tracebacks on errors")
  _distributed.add_arguments(c)
  c.set_defaults(func=_distributed.run_compress)

  e = sub.add_parser("expand", help="a dense checkpoint from a compressed one",
                     description="Expand a compressed checkpoint back to dense matrices.",
                     epilog=EPILOG_EXPAND, formatter_class=argparse.RawDescriptionHelpFormatter)
  e.add_argument("input", metavar="IN", help="compressed .safetensors file")
  e.add_argument("output", metavar="OUT", help="output .safetensors file or orbax directory")
  e.add_argument("--dtype", type=dtype_arg, default="bf16", metavar="bf16|f32",
                 help="dtype of the expanded matrices (default bf16)")
  t = e.add_mutually_exclusive_group()
  t.add_argument("--truncate-rate", type=positive("rate"), metavar="R",
                 help="first keep only the cuts that rate R pays for")
  t.add_argument("--truncate-bits", type=positive("bits"), metavar="B",
                 help="first keep only the cuts that B bits per weight pay for")
  e.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
  e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                 help="show tracebacks on errors")
  e.set_defaults(func=_expand.run)

  i = sub.add_parser("inspect", help="a table of what a compressed checkpoint holds",
                     description="List the leaves of a compressed checkpoint.",
                     epilog=EPILOG_INSPECT, formatter_class=argparse.RawDescriptionHelpFormatter)
  i.add_argument("file", metavar="FILE", help="compressed .safetensors file")
  i.add_argument("--original", metavar="IN",
                 help="the dense checkpoint it came from: measure the relative errors")
  i.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                 help="show tracebacks on errors")
  i.set_defaults(func=_inspect.run)
  return p


def _message(e: BaseException) -> str:
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    return f"{e.filename}: {e.strerror}"
  return " ".join(str(e).split()) or type(e).__name__


def main(argv=None) -> int:
  """Runs the command line; returns the exit status.

  Example:
    >>> main(["inspect", "/no/such/file.safetensors"])
    1
  """
  # From the command line (argv None) the handler stays for the shutdown that follows.
  previous = _interrupts.install()
  try:
    parser = build_parser()
    try:
      args = parser.parse_args(argv)
    except SystemExit as e:
      return e.code if isinstance(e.code, int) else 2
    status = _run(args)
    if _interrupts.STATE.seen:   # a KeyboardInterrupt that something swallowed
      _interrupts.report()
      return 130
    return status
  finally:
    if argv is None:
      _interrupts.STATE.finished = True
    elif previous is not None:
      signal.signal(signal.SIGINT, previous)


def _run(args) -> int:
  try:
    return args.func(args)
  except KeyboardInterrupt:
    _interrupts.report()
    return 130
  except (CliError, ValueError, TypeError, OSError) as e:
    if getattr(args, "debug", False):
      raise
    print(f"jax-signedcut: error: {_message(e)}", file=sys.stderr)
    return 1
  except Exception as e:  # noqa: BLE001  (anything else is a bug: still one line)
    if getattr(args, "debug", False):
      raise
    print(f"jax-signedcut: internal error: {type(e).__name__}: {_message(e)} (run with "
          "--debug for the traceback)", file=sys.stderr)
    return 3
