"""The calibration texts stay apart from the evaluation texts."""

from jax_signedcut.models import calibration_texts, eval_texts


def test_calibration_and_development_texts_are_disjoint_from_evaluation():
  evaluation = set(eval_texts.SENTENCES + eval_texts.QUERIES + eval_texts.DOCUMENTS)
  cal = set(calibration_texts.CALIBRATION)
  dev = set(calibration_texts.DEVELOPMENT)
  assert len(cal) == len(calibration_texts.CALIBRATION) >= 300
  assert not cal & evaluation and not dev & evaluation and not cal & dev
  assert calibration_texts.CALIBRATION == (calibration_texts.HANDWRITTEN
                                           + calibration_texts.PYTHON_DOCS)
