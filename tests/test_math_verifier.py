r"""The math verifier on a table of tricky cases, extraction, normalisation, batching and the timeout guard."""

import time

import numpy as np
import pytest

from maxrl_jax.text import math_verifier as mv

# (response, reference, expected reward) with the paper's "boxed" extraction.
BOXED_TABLE = [
    # Numbers: separators, trailing zeros, signs, decimals vs fractions.
    (r"so the answer is \boxed{72}.", "72", True),
    (r"\boxed{72.00}", "72", True),
    (r"\boxed{72.5}", "72", False),
    (r"\boxed{1,234,567}", "1234567", True),
    (r"\boxed{1{,}000}", "1000", True),
    (r"\boxed{0.50}", r"\frac{1}{2}", True),
    (r"\boxed{.5}", "1/2", True),
    (r"\boxed{-\frac{3}{4}}", "-0.75", True),
    (r"\boxed{\dfrac{6}{8}}", "3/4", True),
    (r"\boxed{\frac34}", "0.75", True),
    (r"\boxed{2\frac{1}{2}}", "5/2", True),
    (r"\boxed{1e3}", "1000", True),
    (r"\boxed{1e400}", "1", False),  # absurd exponents are not parsed as numbers
    (r"\boxed{0.5}", "1/3", False),
    (r"\boxed{-5}", "5", False),
    (r"\boxed{+5}", "5", True),
    # Units, currency, percent, degrees, text wrappers.
    (r"\boxed{\$18}", "18", True),
    (r"\boxed{18 \text{ dollars}}", "18", True),
    (r"\boxed{12\text{ cm}^2}", "12", True),
    (r"\boxed{50\%}", "50", True),
    (r"\boxed{90^\circ}", "90", True),
    (r"\boxed{\text{5 apples}}", "5", True),
    (r"\boxed{\textbf{42}}", "42", True),
    (r"\boxed{x = 5}", "5", True),
    (r"\boxed{\text{(B)}}", "B", True),
    # Structure: last box wins, nested braces, unbalanced, no box, the "\boxed 5" form.
    (r"first \boxed{3}, finally \boxed{4}", "4", True),
    (r"first \boxed{3}, finally \boxed{4}", "3", False),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", True),
    (r"\boxed{4", "4", False),
    ("The answer is 4.", "4", False),
    (r"so \boxed 7.", "7", True),
    (r"\fbox{9}", "9", True),
    # Tuples and intervals.
    (r"\boxed{(1, 2)}", "(1,2)", True),
    (r"\boxed{\left( 3, 4 \right)}", "(3,4)", True),
    (r"\boxed{(2, 1)}", "(1,2)", False),
    (r"\boxed{[1, 2)}", "(1,2)", False),
    (r"\boxed{(0.5, \frac{3}{2})}", r"(\frac{1}{2}, 1.5)", True),
    # Symbolic (sympy) and guarded inputs.
    (r"\boxed{2x+1}", "1+2x", True),
    (r"\boxed{2\pi}", r"\pi \cdot 2", True),
    (r"\boxed{x^2-1}", "(x-1)(x+1)", True),
    (r"\boxed{x^2+1}", "(x-1)(x+1)", False),
    (r"\boxed{10^{9^{9^9}}}", "1", False),  # exponent towers are refused, not evaluated
    (r"\boxed{__import__('os').system('true')}", "0", False),  # never evaluated
]
SYMPY_CASES = {r"\boxed{\frac{\sqrt{2}}{2}}", r"\boxed{2x+1}", r"\boxed{2\pi}", r"\boxed{x^2-1}"}


@pytest.mark.parametrize("response, reference, expected", BOXED_TABLE)
def test_verifier_table(response, reference, expected):
  if response in SYMPY_CASES:
    pytest.importorskip("sympy")
  assert mv.verify(response, reference) is expected


def test_hash_and_auto_modes():
  gsm8k = "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,234\n"
  assert mv.extract_answer(gsm8k, "hash") == "1,234"
  assert mv.verify(gsm8k, "1234", answer_mode="hash")
  assert not mv.verify(gsm8k, "1234", answer_mode="boxed")  # the paper's verifier needs a box
  assert mv.verify(gsm8k, "1234", answer_mode="auto")
  assert mv.extract_answer(r"#### 3 and \boxed{5}", "auto") == "5"
  with pytest.raises(ValueError, match="answer mode"):
    mv.extract_answer("x", "last_number")


def test_extraction_nested_braces():
  assert mv.last_boxed(r"\boxed{\frac{a}{\sqrt{b}}} end") == r"\frac{a}{\sqrt{b}}"
  assert mv.last_boxed(r"\boxed{}") == ""
  assert mv.last_boxed("nothing") is None


def test_normalisation_examples():
  assert mv.normalize_answer(r"\$1,000.") == "1000"
  assert mv.normalize_answer(r"\left(1,2\right)") == "(1,2)"
  assert mv.normalize_answer(r"\tfrac12") == r"\frac{1}{2}"
  assert mv.parse_number(r"-\frac{1}{4}") == mv.fractions.Fraction(-1, 4)
  assert mv.parse_number("2x") is None


def test_canonical_answer_for_majority_vote():
  assert mv.canonical_answer(r"\boxed{0.50}") == mv.canonical_answer(r"\boxed{\frac{1}{2}}") == "1/2"
  assert mv.canonical_answer("no box") is None


def test_batched_scoring_and_groups():
  verifier = mv.MathVerifier(num_threads=2)
  responses = [[r"\boxed{1}", r"\boxed{2}", "none"], [r"\boxed{3.0}", r"\boxed{4}", r"\boxed{3}"]]
  rewards = verifier.score_groups(responses, ["1", "3"])
  np.testing.assert_array_equal(rewards, [[1, 0, 0], [1, 0, 1]])
  assert rewards.dtype == np.float32
  assert verifier.last_stats["verify_timeouts"] == 0
  with pytest.raises(ValueError):
    verifier(["a"], ["1", "2"])


def test_timeout_guard_scores_slow_items_zero_without_waiting():
  def slow_on_two(i):
    if i == 2:
      time.sleep(3.0)
    return 1.0

  start = time.monotonic()
  values, timeouts, errors = mv.run_with_timeout(slow_on_two, 6, timeout_s=0.2, num_threads=2)
  assert time.monotonic() - start < 2.0
  np.testing.assert_array_equal(values, [1, 1, 0, 1, 1, 1])
  assert (timeouts, errors) == (1, 0)


def test_timeout_guard_recovers_when_every_worker_hangs():
  def hang_first_two(i):
    if i < 2:
      time.sleep(3.0)
    if i == 3:
      raise RuntimeError("bad item")
    return 1.0

  start = time.monotonic()
  values, timeouts, errors = mv.run_with_timeout(hang_first_two, 5, timeout_s=0.2, num_threads=2)
  assert time.monotonic() - start < 2.0
  np.testing.assert_array_equal(values, [0, 0, 1, 0, 1])
  assert (timeouts, errors) == (2, 1)


def test_long_responses_are_cut_to_their_end():
  verifier = mv.MathVerifier(max_response_chars=100)
  assert verifier.score("x" * 100_000 + r" \boxed{7}", "7") == 1.0
