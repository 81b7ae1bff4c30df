"""Calibrated compression: input statistics, output-error objectives, GPTQ, bit allocation.

See ``README.md`` beside this file for the design. ``allocate`` and ``gptq``
are not re-exported here: their modules have the same names (import them
from ``jax_signedcut._calibration.allocate`` / ``.gptq``).
"""

from jax_signedcut._calibration.cuts import CutOptions as CutOptions
from jax_signedcut._calibration.cuts import calibrated_cuts as calibrated_cuts
from jax_signedcut._calibration.cuts import error_curve as error_curve
from jax_signedcut._calibration.cuts import fit_budget as fit_budget
from jax_signedcut._calibration.objective import hcut_decompose as hcut_decompose
from jax_signedcut._calibration.objective import output_error as output_error
from jax_signedcut._calibration.objective import refit_scales as refit_scales
from jax_signedcut._calibration.objective import (
    relative_output_error as relative_output_error)
from jax_signedcut._calibration.objective import sparse_by_impact as sparse_by_impact
from jax_signedcut._calibration.parts import InputScaled as InputScaled
from jax_signedcut._calibration.parts import Transposed as Transposed
from jax_signedcut._calibration.stats import Calibration as Calibration
from jax_signedcut._calibration.stats import calibrate as calibrate
from jax_signedcut._calibration.stats import calibrate_linen as calibrate_linen
from jax_signedcut._calibration.stats import load_calibration as load_calibration
from jax_signedcut._calibration.stats import save_calibration as save_calibration

__all__ = [
    "Calibration", "CutOptions", "InputScaled", "Transposed", "calibrate",
    "calibrate_linen", "calibrated_cuts", "error_curve", "fit_budget", "hcut_decompose",
    "load_calibration", "output_error", "refit_scales", "relative_output_error",
    "save_calibration", "sparse_by_impact",
]
