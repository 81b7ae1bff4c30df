"""Checkpoints of compressed pytrees: save, load, expand, orbax.

Every compressed type (signed cuts and sums of parts, RTN codes, LPLR/DSVD/ℓp
low-rank factors, tensor cuts) is stored by a registered, versioned codec;
files of every earlier format version still load.
"""

from jax_signedcut._checkpoint.expand import expand as expand
from jax_signedcut._checkpoint.format import FORMAT as FORMAT
from jax_signedcut._checkpoint.format import VERSION as VERSION
from jax_signedcut._checkpoint.format import CheckpointError as CheckpointError
from jax_signedcut._checkpoint.orbax import load_orbax as load_orbax
from jax_signedcut._checkpoint.orbax import save_orbax as save_orbax
from jax_signedcut._checkpoint.reader import load as load
from jax_signedcut._checkpoint.reader import load_info as load_info
from jax_signedcut._checkpoint.writer import save as save

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "expand",
    "load",
    "load_info",
    "load_orbax",
    "save",
    "save_orbax",
]
