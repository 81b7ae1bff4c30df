"""Result types of calibrated compression (protocol parts, see :mod:`jax_signedcut._parts.scaled`)."""

from jax_signedcut._parts.scaled import InputScaled as InputScaled
from jax_signedcut._parts.scaled import Transposed as Transposed

__all__ = ["InputScaled", "Transposed"]
