"""jax_signedcut: 1-bit signed cut decompositions of weight matrices in JAX."""

from jax_signedcut._kernels.apply import apply_signed_cut as apply_signed_cut
from jax_signedcut._methods.attention import AttentionFit as AttentionFit
from jax_signedcut._methods.attention import attention_grad as attention_grad
from jax_signedcut._methods.attention import attention_loss as attention_loss
from jax_signedcut._methods.attention import attention_loss_kron as attention_loss_kron
from jax_signedcut._methods.attention import attention_probs as attention_probs
from jax_signedcut._methods.attention import fit_attention as fit_attention
from jax_signedcut._signedcut.backfit import backfit as backfit
from jax_signedcut._signedcut.budget import bytes_per_cut as bytes_per_cut
from jax_signedcut._signedcut.budget import width_for_bits as width_for_bits
from jax_signedcut._signedcut.budget import width_for_rate as width_for_rate
from jax_signedcut.checkpoint import CheckpointError as CheckpointError
from jax_signedcut.checkpoint import expand as expand
from jax_signedcut.checkpoint import load as load
from jax_signedcut.checkpoint import load_info as load_info
from jax_signedcut.checkpoint import load_orbax as load_orbax
from jax_signedcut.checkpoint import save as save
from jax_signedcut.checkpoint import save_orbax as save_orbax
from jax_signedcut._signedcut.decompose import decompose as decompose
from jax_signedcut._signedcut.decompose import decompose_leafwise as decompose_leafwise
from jax_signedcut._core.protocol import Compressed as Compressed
from jax_signedcut._core.protocol import is_compressed as is_compressed
from jax_signedcut._core.protocol import matmul as matmul
from jax_signedcut._core.protocol import nbytes as nbytes
from jax_signedcut._core.protocol import reconstruct as reconstruct
from jax_signedcut._core.protocol import relative_error as relative_error
from jax_signedcut._parts.lowrank import LowRankPart as LowRankPart
from jax_signedcut._parts.scaled import InputScaled as InputScaled
from jax_signedcut._parts.scaled import Transposed as Transposed
from jax_signedcut._parts.sparse import Sparse as Sparse
from jax_signedcut._parts.sum import Sum as Sum
from jax_signedcut._parts.blocks import RowBlocks as RowBlocks
from jax_signedcut._signedcut.factors import SignedCut as SignedCut
from jax_signedcut._signedcut.factors import truncate as truncate
from jax_signedcut._methods.lp_lowrank import lp_cost as lp_cost
from jax_signedcut._methods.lp_lowrank import lp_lowrank as lp_lowrank
from jax_signedcut._methods.lplr import LowRank as LowRank
from jax_signedcut._methods.lplr import dsvd as dsvd
from jax_signedcut._methods.lplr import lowrank_nbytes as lowrank_nbytes
from jax_signedcut._methods.lplr import lplr as lplr
from jax_signedcut._methods.lplr import rank_for_bits as rank_for_bits
from jax_signedcut._methods.lplr import reconstruct_lowrank as reconstruct_lowrank
from jax_signedcut._signedcut.packing import pack_signs as pack_signs
from jax_signedcut._signedcut.packing import unpack_signs as unpack_signs
from jax_signedcut._methods.rtn import QuantizedMatrix as QuantizedMatrix
from jax_signedcut._methods.rtn import dequantize as dequantize
from jax_signedcut._methods.rtn import dequantize_matrix as dequantize_matrix
from jax_signedcut._methods.rtn import num_levels as num_levels
from jax_signedcut._methods.rtn import quantize as quantize
from jax_signedcut._methods.rtn import rtn as rtn
from jax_signedcut._methods.rtn import rtn_bits_per_weight as rtn_bits_per_weight
from jax_signedcut._signedcut.start import start_words as start_words
from jax_signedcut._signedcut.tensor import SignedTensorCut as SignedTensorCut
from jax_signedcut._signedcut.tensor import decompose_tensor as decompose_tensor
from jax_signedcut._signedcut.tensor import reconstruct_tensor as reconstruct_tensor
from jax_signedcut._signedcut.tensor import tensor_bytes_per_cut as tensor_bytes_per_cut
from jax_signedcut._core.tree import Budget as Budget
from jax_signedcut._calibration.distill import DistillResult as DistillResult
from jax_signedcut._calibration.distill import distill as distill
from jax_signedcut._calibration.stats import Calibration as Calibration
from jax_signedcut._calibration.stats import calibrate as calibrate
from jax_signedcut._calibration.stats import calibrate_linen as calibrate_linen
from jax_signedcut._calibration.stats import load_calibration as load_calibration
from jax_signedcut._calibration.stats import save_calibration as save_calibration

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "CheckpointError",
    "Compressed",
    "InputScaled",
    "Transposed",
    "LowRankPart",
    "Sparse",
    "Sum",
    "RowBlocks",
    "is_compressed",
    "matmul",
    "SignedCut",
    "apply_signed_cut",
    "backfit",
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
    # The other methods.
    "AttentionFit",
    "attention_grad",
    "attention_loss",
    "attention_loss_kron",
    "attention_probs",
    "fit_attention",
    "LowRank",
    "dsvd",
    "lp_cost",
    "lp_lowrank",
    "lowrank_nbytes",
    "lplr",
    "rank_for_bits",
    "reconstruct_lowrank",
    "QuantizedMatrix",
    "dequantize",
    "dequantize_matrix",
    "num_levels",
    "quantize",
    "rtn",
    "rtn_bits_per_weight",
    "SignedTensorCut",
    "decompose_tensor",
    "reconstruct_tensor",
    "tensor_bytes_per_cut",
    # Calibration: input statistics for decompose(..., calibration=...).
    "Calibration",
    "DistillResult",
    "distill",
    "calibrate",
    "calibrate_linen",
    "load_calibration",
    "save_calibration",
]
