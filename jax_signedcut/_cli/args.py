"""Command-line arguments: budgets, rules, methods and their options, one-line errors."""

from __future__ import annotations

import argparse
import math


class CliError(Exception):
  """A user-facing error: printed as one line."""


class Parser(argparse.ArgumentParser):
  """argparse with one-line errors (no usage dump)."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive(kind):
  def conv(s):
    try:
      v = int(s) if kind == "width" else float(s)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{kind} must be a {'whole' if kind == 'width' else ''} "
                                       f"number, got {s!r}".replace("  ", " ")) from None
    if not math.isfinite(v) or v <= 0:
      raise argparse.ArgumentTypeError(f"{kind} must be > 0, got {s!r}")
    return v
  return conv


def outliers_arg(s):
  if s == "auto":
    return "auto"
  try:
    v = float(s)
  except ValueError:
    raise argparse.ArgumentTypeError(f"outliers must be auto, 0 or a fraction in (0, 1), "
                                     f"got {s!r}") from None
  if not 0 <= v < 1:
    raise argparse.ArgumentTypeError(f"outliers must be auto, 0 or a fraction in (0, 1), "
                                     f"got {s!r}")
  return 0 if v == 0 else v


#: Budget keys of an option of the budget's method: ``option.group_size=64``.
OPTION_PREFIX = "option."

_BUDGET_KEYS = {"rate": "rate", "bits": "bits_per_weight", "bits_per_weight": "bits_per_weight",
                "width": "width", "max_error": "max_error", "max-error": "max_error",
                "outliers": "outliers", "lowrank": "lowrank", "method": "method"}


def lowrank_arg(s):
  if s == "auto":
    return s
  try:
    v = int(s)
  except ValueError:
    raise argparse.ArgumentTypeError(f"lowrank must be an int >= 0 or auto, got {s!r}") from None
  if v < 0:
    raise argparse.ArgumentTypeError(f"lowrank must be an int >= 0 or auto, got {s!r}")
  return v


def parse_budget(text: str):
  """A :class:`Budget` (or ``None`` for ``dense``) from ``rate=0.25,max_error=0.05``.

  ``method=NAME`` picks another method and ``option.KEY=VALUE`` sets one of its
  options (``bits=4,method=rtn,option.group_size=64``; a tuple is ``8:4``).
  """
  from jax_signedcut._core import tree as _tree  # noqa: PLC0415
  from jax_signedcut._core.tree import Budget  # noqa: PLC0415

  text = text.strip()
  if text == "dense":
    return None
  fields, options = {}, {}
  for part in _split_budget(text):
    key, sep, value = part.strip().partition("=")
    if sep and key.startswith(OPTION_PREFIX) and _is_option_name(key[len(OPTION_PREFIX):]):
      options[key[len(OPTION_PREFIX):]] = option_value(value)
      continue
    if not sep or key not in _BUDGET_KEYS:
      raise argparse.ArgumentTypeError(
          f"bad budget {text!r}: expected e.g. rate=0.25, bits=4, width=128, max_error=0.05 "
          "or dense")
    name = _BUDGET_KEYS[key]
    conv = outliers_arg if name == "outliers" else lowrank_arg if name == "lowrank" else \
        method_arg if name == "method" else positive("width" if name == "width" else key)
    try:
      fields[name] = conv(value)
    except argparse.ArgumentTypeError as e:
      raise argparse.ArgumentTypeError(f"bad budget {text!r}: {e}") from None
  if not any(k in fields for k in ("rate", "bits_per_weight", "width")):
    if "max_error" not in fields:
      raise argparse.ArgumentTypeError(f"bad budget {text!r}: give rate, bits, width or "
                                       "max_error")
    fields["rate"] = 1.0   # max_error alone: capped at the bf16 size
  if sum(k in fields for k in ("rate", "bits_per_weight", "width")) > 1:
    raise argparse.ArgumentTypeError(f"bad budget {text!r}: give only one of rate, bits, width")
  if options:
    if "method" not in fields:
      raise argparse.ArgumentTypeError(f"bad budget {text!r}: options {sorted(options)} need "
                                       "the method they are for (method=...)")
    fields["options"] = options
  try:
    return _tree._check_budget(Budget(**fields), "budget")  # noqa: SLF001
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"bad budget {text!r}: {e}") from None


def rule_arg(text: str):
  if text.endswith("=dense"):
    regex, budget = text[:-len("=dense")], "dense"
  else:
    # REGEX=KEY=VALUE[,KEY=VALUE...]: the budget starts at the first KEY= that
    # follows a '='.
    cut = None
    for key in _BUDGET_KEYS:
      i = text.find("=" + key + "=")
      if i >= 0 and (cut is None or i < cut):
        cut = i
    if cut is None:
      raise argparse.ArgumentTypeError(
          f"bad rule {text!r}: expected REGEX=BUDGET, e.g. 'attn=rate=0.25' or 'embed=dense'")
    regex, budget = text[:cut], text[cut + 1:]
  import re  # noqa: PLC0415
  try:
    re.compile(regex)
  except re.error as e:
    raise argparse.ArgumentTypeError(f"bad rule {text!r}: bad regex {regex!r}: {e}") from None
  try:
    return regex, parse_budget(budget)
  except argparse.ArgumentTypeError as e:
    raise argparse.ArgumentTypeError(f"bad rule {text!r}: {e}") from None


def default_budget(args):
  """The budget of leaves no rule matches (None: keep them), from --rate/--bits/--width/…."""
  from jax_signedcut._core.tree import Budget  # noqa: PLC0415

  if args.rate is None and args.bits is None and args.width is None:
    if args.max_error is None:
      return None
    return Budget(rate=1.0, max_error=args.max_error)
  return Budget(width=args.width, rate=args.rate, bits_per_weight=args.bits,
                max_error=args.max_error)


def method_arg(s):
  from jax_signedcut._methods import registry  # noqa: PLC0415

  if s not in registry.names():
    raise argparse.ArgumentTypeError(f"method must be one of {', '.join(registry.names())}, "
                                     f"got {s!r}")
  return s


def _is_option_name(key: str) -> bool:
  return key.isidentifier()


def option_value(s: str):
  """An option value: an int, a float, true/false/none, a tuple ``8:4``, else the string."""
  if ":" in s:
    return tuple(option_value(p) for p in s.split(":"))
  low = s.lower()
  if low in ("true", "false"):
    return low == "true"
  if low in ("none", "null"):
    return None
  for conv in (int, float):
    try:
      return conv(s)
    except ValueError:
      pass
  return s


def option_arg(text: str):
  """``KEY=VALUE`` of ``--option``."""
  key, sep, value = text.partition("=")
  if not sep or not _is_option_name(key):
    raise argparse.ArgumentTypeError(f"bad option {text!r}: expected KEY=VALUE, e.g. "
                                     "group_size=64 or bits=8:4")
  return key, option_value(value)


def check_method_args(args) -> None:
  """--method's checks: its options are known, and the signed-cut-only flags are not given."""
  from jax_signedcut._methods import registry  # noqa: PLC0415

  options = dict(args.option or [])
  calibrated = bool(getattr(args, "calibration", None))
  if args.method != registry.SIGNED_CUT and registry.get(args.method).calibration == "required" \
      and not calibrated:
    raise CliError(f"--method {args.method} needs input statistics: give --calibration FILE")
  if args.method == registry.SIGNED_CUT:
    if options and not calibrated:
      raise CliError(f"--option is for the other methods (--method rtn, lplr, …), or for signed "
                     f"cuts with --calibration; signed cuts take their own flags, got "
                     f"{sorted(options)}")
    try:
      registry.check_options(args.method, options)
    except ValueError as e:
      raise CliError(str(e)) from None
    return
  try:
    registry.check_options(args.method, options)
  except ValueError as e:
    raise CliError(str(e)) from None
  given = [flag for flag, v in (("--width", args.width), ("--max-error", args.max_error),
                                ("--lowrank", args.lowrank or None),
                                ("--outliers", None if args.outliers == "auto" else args.outliers))
           if v is not None]
  if given:
    raise CliError(f"--method {args.method} takes a --rate or --bits budget, not "
                   f"{', '.join(given)}")


def _split_budget(text: str) -> list[str]:
  return text.split(",")


