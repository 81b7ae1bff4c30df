"""jax_signedcut: 1-bit signed cut decompositions of weight matrices in JAX."""

from jax_signedcut._apply import apply_signed_cut as apply_signed_cut
from jax_signedcut._budget import bytes_per_cut as bytes_per_cut
from jax_signedcut._budget import width_for_bits as width_for_bits
from jax_signedcut._budget import width_for_rate as width_for_rate
from jax_signedcut._checkpoint import expand as expand
from jax_signedcut._checkpoint import load as load
from jax_signedcut._checkpoint import load_info as load_info
from jax_signedcut._checkpoint import load_orbax as load_orbax
from jax_signedcut._checkpoint import save as save
from jax_signedcut._checkpoint import save_orbax as save_orbax
from jax_signedcut._decompose import decompose as decompose
from jax_signedcut._decompose import decompose_leafwise as decompose_leafwise
from jax_signedcut._factors import SignedCut as SignedCut
from jax_signedcut._factors import nbytes as nbytes
from jax_signedcut._factors import reconstruct as reconstruct
from jax_signedcut._factors import relative_error as relative_error
from jax_signedcut._factors import truncate as truncate
from jax_signedcut._packing import pack_signs as pack_signs
from jax_signedcut._packing import unpack_signs as unpack_signs
from jax_signedcut._start import start_words as start_words
from jax_signedcut._tree import Budget as Budget

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "SignedCut",
    "apply_signed_cut",
    "bytes_per_cut",
    "decompose",
    "decompose_leafwise",
    "expand",
    "load",
    "load_info",
    "load_orbax",
    "nbytes",
    "pack_signs",
    "reconstruct",
    "relative_error",
    "save",
    "save_orbax",
    "start_words",
    "truncate",
    "unpack_signs",
    "width_for_bits",
    "width_for_rate",
]
