"""Compression methods by name: what ``decompose(..., method=NAME)`` and ``Budget(method=NAME)`` run.

Each method is one module that registers a :class:`Method`: its name, the
options it takes, and a compress function that turns a float array
(..., m, n) and a budget in **bits per weight** (the common currency; a
``rate`` r of the bf16 size is 16·r bits per weight) into a compressed value
whose ``nbytes`` stays within that budget. The signed cut method itself is
``decompose``'s own path (it also takes ``width`` and ``max_error``); the
others register here from their modules, which ``get`` imports on first use.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple

#: The method decompose runs unless told otherwise.
SIGNED_CUT = "signed_cut"
#: Modules that register the other methods (imported on first look-up).
_MODULES = ("jax_signedcut._methods.rtn", "jax_signedcut._methods.lplr",
            "jax_signedcut._methods.lp_lowrank", "jax_signedcut._calibration.gptq")
#: ``Method.calibration``: whether a method takes input statistics (``decompose(calibration=)``).
CALIBRATION_USES = ("none", "optional", "required")


class Method(NamedTuple):
  """A compression method under the common budget.

  Attributes:
    name: the name ``decompose(method=...)`` takes.
    compress: ``compress(a, *, key, bits_per_weight, **options) -> Compressed``
      for a float array (..., m, n) (jittable, vmappable; ``key`` is a key of
      shape () that the method may ignore). It raises ValueError when the
      budget pays for nothing of this method on this shape.
    options: the option names ``compress`` accepts, with their defaults.
    doc: one line for listings (``jax-signedcut compress --help``).
    calibration: ``"none"`` (the method cannot use input statistics: giving
      them is an error), ``"optional"`` or ``"required"``; a method that takes
      them gets ``compress(..., calibration=h)`` with ``h`` the (m, m) input
      second moment of the Flax-layout (in, out) = (m, n) matrix.
  """

  name: str
  compress: Callable[..., Any]
  options: dict
  doc: str
  calibration: str = "none"


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds ``method`` to the registry (one call per method module, at import)."""
  if method.calibration not in CALIBRATION_USES:
    raise ValueError(f"calibration must be one of {CALIBRATION_USES}, got {method.calibration!r}")
  if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
    raise ValueError(f"a method named {method.name!r} is already registered")
  _REGISTRY[method.name] = method
  return method


def _load() -> None:
  for mod in _MODULES:
    importlib.import_module(mod)


def names() -> tuple[str, ...]:
  """Every method name, signed cuts first."""
  _load()
  return (SIGNED_CUT,) + tuple(sorted(_REGISTRY))


def get(name: str) -> Method:
  """The registered method called ``name``.

  Raises:
    ValueError: no such method (naming the known ones).
  """
  _load()
  if not isinstance(name, str) or name not in _REGISTRY:
    raise ValueError(f"method must be one of {list(names())}, got {name!r}")
  return _REGISTRY[name]


def calibrated_names() -> tuple[str, ...]:
  """The registered methods that take calibration statistics (signed cuts take them too)."""
  _load()
  return tuple(sorted(k for k, m in _REGISTRY.items() if m.calibration != "none"))


def check_options(name: str, options) -> tuple[tuple[str, Any], ...]:
  """``options`` (a dict, pairs or None) as sorted hashable pairs, checked against the method.

  Hashable so that a :class:`~jax_signedcut.Budget` holding them stays static
  configuration under ``jax.jit``.
  """
  if options is None:
    return ()
  items = dict(options).items() if not isinstance(options, dict) else options.items()
  if name == SIGNED_CUT:   # only with calibration (checked where the statistics are known)
    from jax_signedcut._calibration.api import SIGNED_CUT_OPTIONS as allowed  # noqa: PLC0415
  else:
    allowed = get(name).options
  unknown = sorted(k for k, _ in items if k not in allowed)
  if unknown:
    raise ValueError(f"method {name!r} takes the options {sorted(allowed)}, got unknown "
                     f"{unknown}")
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in items))
