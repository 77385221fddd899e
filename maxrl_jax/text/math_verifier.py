r"""Math answer verifier: extract a final answer, normalise it, compare it with the reference.

Plain Python, run on the host between sampling and the advantage computation (the trainer decodes the
sampled tokens, scores them here, and feeds the [P, N] rewards to the jitted update).

    verifier = MathVerifier(answer_mode="boxed", timeout_s=5.0)
    rewards_PxN = verifier.score_groups(responses_PxN, gold_answers_P)   # float32 0/1
    verify(r"... so the answer is \boxed{\frac{1}{2}}.", "0.5")           # True

Extraction (`extract_answer`):
  boxed: the content of the LAST \boxed{...} (or \fbox{...}), braces matched to any depth; also
    "\boxed 5". A response with no (complete) box scores 0.
  hash:  the text after the last "####" up to the end of its line (GSM8K's reference format).
  auto:  boxed if there is one, else hash.

Normalisation (`normalize_answer`), applied to both sides: strips $ and \( \) delimiters, \left/\right,
latex spacing (\! \, \; \: \quad ~), \displaystyle, \text{}/\mathrm{}/\textbf{}/\mbox{} wrappers (keeping
their content), degree signs, "%" and "\%", currency "$", a trailing period, a leading "x =" (one
variable), units after a number ("12 cm", "5\text{ dollars}" -> the number), thousands separators
("1,234,567", "1{,}000") and spaces; \dfrac/\tfrac -> \frac; "\frac12" -> "\frac{1}{2}"; "(B)" -> "B".

Comparison (`is_equivalent`), first match wins:
  1. equal normalised strings;
  2. both parse as exact rational numbers (integers, decimals, scientific notation up to 1e+-100, a/b,
     \frac{a}{b}, mixed numbers 2\frac{1}{2}, signs) and are equal: "5.00" == "5", "0.5" == "1/2";
  3. both are tuples / intervals with the same brackets (or plain comma lists) of equal length, compared
     element by element;
  4. (symbolic=True and sympy installed) both convert to short sympy expressions (only digits, + - * / ^,
     parentheses, \frac, \sqrt, \pi, \cdot, single-letter variables and a few function names; nothing else
     is ever evaluated) and sympy.simplify(a - b) == 0.
  Anything else, a parse error or an exception is 0.

Timeout guard: `MathVerifier.__call__` scores items on a thread pool; an item running longer than
`timeout_s` (wall time) scores 0 and is abandoned (Python cannot stop a thread; the input-size limits on
the symbolic path keep this a last resort), and the batch never waits longer than the slowest item up to
that timeout.
"""

from __future__ import annotations

import concurrent.futures
import fractions
import re
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

ANSWER_MODES = ("boxed", "hash", "auto")
_MAX_EXPONENT = 100  # Decimal exponents beyond this do not parse as numbers.
_MAX_SYMBOLIC_CHARS = 80  # Longer answers skip the symbolic comparison.


# ----------------------------------------------------------------------------------------------------------
# Extraction.
# ----------------------------------------------------------------------------------------------------------


def _matching_brace(text: str, open_index: int) -> int | None:
    """Index of the '}' closing the '{' at open_index, or None when unbalanced."""
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} / \fbox{...} (nested braces), or of "\boxed 5"; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if i < len(text) and text[i] == "{":
        end = _matching_brace(text, i)
        return None if end is None else text[i + 1 : end]
    if i < len(text) and text[i] == " ":
        match = re.match(r"\s*([^\s$]+)", text[i:])
        return match.group(1) if match else None
    return None


def hash_answer(text: str) -> str | None:
    """Text after the last '####' up to the end of its line (stripped), or None."""
    if "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
    return answer or None


def extract_answer(text: str, mode: str = "boxed") -> str | None:
    """The final answer of a response under `mode` ("boxed", "hash" or "auto"), or None."""
    if mode == "boxed":
        return last_boxed(text)
    if mode == "hash":
        return hash_answer(text)
    if mode == "auto":
        boxed = last_boxed(text)
        return boxed if boxed is not None else hash_answer(text)
    raise ValueError(f"answer mode {mode!r}; allowed: {list(ANSWER_MODES)}.")


# ----------------------------------------------------------------------------------------------------------
# Normalisation.
# ----------------------------------------------------------------------------------------------------------

_WRAPPERS = ("\\text", "\\textbf", "\\textit", "\\mathrm", "\\mathbf", "\\mbox", "\\operatorname")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def _unwrap_commands(s: str) -> str:
    r"""\text{abc} -> abc for every wrapper command (nested braces kept balanced)."""
    for command in sorted(_WRAPPERS, key=len, reverse=True):
        while True:
            i = s.find(command + "{")
            if i < 0:
                break
            end = _matching_brace(s, i + len(command))
            if end is None:
                break
            s = s[:i] + s[i + len(command) + 1 : end] + s[end + 1 :]
    return s


def _brace_short_arguments(s: str) -> str:
    r"""\frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}, \sqrt2 -> \sqrt{2}."""
    s = re.sub(r"\\frac\s*(\w)\s*(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\w)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\w)", r"\\frac\1{\2}", s)
    return re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)


def normalize_answer(answer: str) -> str:
    """Canonical string of an answer (see the module docstring); '' for None or empty."""
    if answer is None:
        return ""
    s = str(answer).strip()
    if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
        s = s[2:-2]
    for token in ("\\displaystyle", "\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad",
                  "~", "\n", "\\$", "$", "\\%", "%", "^{\\circ}", "^\\circ", "°", "{,}"):
        s = s.replace(token, "" if token not in ("\\,", "\\;", "\\:", "\\quad", "\\qquad", "~", "\n") else " ")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _unwrap_commands(s).strip()
    s = s.rstrip(".").strip()
    # A single "x = ..." (or "\theta = ...") assignment: keep the right-hand side.
    match = re.match(r"^\\?[A-Za-z]\w*\s*=\s*(.+)$", s)
    if match and "=" not in match.group(1):
        s = match.group(1).strip()
    # Units: a number followed by words ("12 cm", "5 dollars", "3 apples each").
    match = re.match(rf"^({_NUMBER}|[-+]?\d{{1,3}}(?:,\d{{3}})+(?:\.\d+)?)\s+[A-Za-z][A-Za-z \-/.^0-9]*$", s)
    if match:
        s = match.group(1)
    s = s.replace(" ", "")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = _brace_short_arguments(s)
    match = re.match(r"^\(([A-Ea-e])\)$", s)  # multiple choice "(B)"
    if match:
        s = match.group(1).upper()
    return s


# ----------------------------------------------------------------------------------------------------------
# Numbers.
# ----------------------------------------------------------------------------------------------------------


def _decimal(s: str) -> fractions.Fraction | None:
    if not re.fullmatch(_NUMBER, s):
        return None
    exponent = re.search(r"[eE]([-+]?\d+)$", s)
    if exponent and abs(int(exponent.group(1))) > _MAX_EXPONENT:
        return None
    return fractions.Fraction(s)


def parse_number(s: str) -> fractions.Fraction | None:
    r"""Exact value of a normalised numeric answer: 12, -3.50, 1e3, 3/4, \frac{3}{4}, -\frac{1}{2},
    2\frac{1}{2}; None when it is not a plain number."""
    if not s:
        return None
    value = _decimal(s)
    if value is not None:
        return value
    sign = -1 if s.startswith("-") else 1
    body = s[1:] if s[:1] in "+-" else s
    match = re.fullmatch(rf"({_NUMBER})/({_NUMBER})", body)
    if match:
        numerator, denominator = _decimal(match.group(1)), _decimal(match.group(2))
        if numerator is not None and denominator:
            return sign * numerator / denominator
        return None
    match = re.fullmatch(r"(\d+)?\\frac\{([^{}]+)\}\{([^{}]+)\}", body)
    if match:
        whole = fractions.Fraction(match.group(1)) if match.group(1) else 0
        numerator, denominator = parse_number(match.group(2)), parse_number(match.group(3))
        if numerator is None or not denominator or (match.group(1) and numerator < 0):
            return None
        return sign * (whole + numerator / denominator)
    return None


# ----------------------------------------------------------------------------------------------------------
# Tuples and symbolic expressions.
# ----------------------------------------------------------------------------------------------------------


def _split_top_level(s: str) -> list[str]:
    """Splits on commas outside (), [], {}."""
    parts, depth, current = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _as_sequence(s: str) -> tuple[str, list[str]] | None:
    """("()", items) for "(a,b)", ("[)", items) for intervals, ("", items) for "a,b"; None otherwise."""
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        inner = s[1:-1]
        depth = 0
        for ch in inner:  # the outer brackets must enclose everything
            depth += ch in "([{"
            depth -= ch in ")]}"
            if depth < 0:
                return None
        items = _split_top_level(inner)
        return (s[0] + s[-1], items) if len(items) >= 2 else None
    items = _split_top_level(s)
    return ("", items) if len(items) >= 2 else None


_SYMPY_FUNCTIONS = {"sqrt", "pi", "oo", "log", "ln", "sin", "cos", "tan", "exp"}


def _latex_to_sympy(s: str) -> str | None:
    r"""A restricted latex -> sympy source conversion; None when anything unknown remains."""
    if len(s) > _MAX_SYMBOLIC_CHARS:
        return None
    rules = (
        (r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))"),
        (r"\\sqrt\[([^{}\[\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))"),
        (r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)"),
        (r"\^\{([^{}]*)\}", r"**(\1)"),
        (r"\{([^{}]*)\}", r"(\1)"),  # plain grouping, only once nothing else applies
    )
    changed = True
    while changed:  # innermost first, repeatedly
        changed = False
        for pattern, replacement in rules:
            s, count = re.subn(pattern, replacement, s)
            if count:
                changed = True
                break
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", " pi ").replace("\\infty", " oo ")
    s = s.replace("\\ln", " ln ").replace("\\log", " log ").replace("\\sin", " sin ").replace("\\cos", " cos ")
    s = s.replace("\\tan", " tan ").replace("\\exp", " exp ").replace("^", "**")
    if not re.fullmatch(r"[0-9A-Za-z+\-*/(). ]+", s):
        return None
    for word in re.findall(r"[A-Za-z]+", s):
        if len(word) > 1 and word not in _SYMPY_FUNCTIONS:
            return None
    if s.count("**") > 1 or len(re.findall(r"\d{7,}", s)) > 0:
        return None  # no towers or huge literals
    return s


def _symbolic_equal(a: str, b: str) -> bool:
    try:
        import sympy  # pylint: disable=import-outside-toplevel
        from sympy.parsing import sympy_parser  # pylint: disable=import-outside-toplevel
    except ImportError:
        return False
    source_a, source_b = _latex_to_sympy(a), _latex_to_sympy(b)
    if source_a is None or source_b is None:
        return False
    transformations = sympy_parser.standard_transformations + (
        sympy_parser.implicit_multiplication_application,
    )
    names = {"ln": sympy.log, "pi": sympy.pi, "oo": sympy.oo, "E": sympy.E}
    try:
        expr_a = sympy_parser.parse_expr(source_a, local_dict=dict(names), transformations=transformations)
        expr_b = sympy_parser.parse_expr(source_b, local_dict=dict(names), transformations=transformations)
        difference = sympy.simplify(expr_a - expr_b)
        return bool(difference == 0)
    except Exception:  # pylint: disable=broad-except  # sympy raises many types on odd input
        return False


# ----------------------------------------------------------------------------------------------------------
# Comparison.
# ----------------------------------------------------------------------------------------------------------


def _equivalent_normalized(p: str, g: str, symbolic: bool, depth: int = 0) -> bool:
    if not p or not g:
        return False
    if p == g:
        return True
    number_p, number_g = parse_number(p), parse_number(g)
    if number_p is not None and number_g is not None:
        return number_p == number_g
    sequence_p, sequence_g = _as_sequence(p), _as_sequence(g)
    if sequence_p is not None and sequence_g is not None and depth < 3:
        (brackets_p, items_p), (brackets_g, items_g) = sequence_p, sequence_g
        return (brackets_p == brackets_g and len(items_p) == len(items_g)
                and all(_equivalent_normalized(x, y, symbolic, depth + 1) for x, y in zip(items_p, items_g)))
    if sequence_p is not None or sequence_g is not None:
        return False
    return symbolic and _symbolic_equal(p, g)


def is_equivalent(prediction: str | None, reference: str, symbolic: bool = True) -> bool:
    """Whether an extracted answer equals the reference answer (see the module docstring)."""
    if prediction is None:
        return False
    return _equivalent_normalized(normalize_answer(prediction), normalize_answer(reference), symbolic)


def verify(response: str, reference: str, answer_mode: str = "boxed", symbolic: bool = True) -> bool:
    """Extracts the final answer of `response` and compares it with `reference` (no timeout)."""
    return is_equivalent(extract_answer(response, answer_mode), reference, symbolic)


def canonical_answer(response: str, answer_mode: str = "boxed") -> str | None:
    """A key for majority voting: the normalised extracted answer (numbers as reduced fractions)."""
    normalized = normalize_answer(extract_answer(response, answer_mode))
    if not normalized:
        return None
    number = parse_number(normalized)
    return str(number) if number is not None else normalized


# ----------------------------------------------------------------------------------------------------------
# Batches with a timeout.
# ----------------------------------------------------------------------------------------------------------


def run_with_timeout(fn: Callable[[int], float], num_items: int, timeout_s: float,
                     num_threads: int) -> tuple[np.ndarray, int, int]:
    """Runs fn(i) for i < num_items on threads; an item running longer than timeout_s (or raising) gives 0.

    Returns:
      (values [num_items] float32, number of timeouts, number of exceptions).
    """
    values = np.zeros(num_items, np.float32)
    timeouts = errors = 0
    remaining = list(range(num_items))
    while remaining:
        starts: dict[int, float] = {}
        lock = threading.Lock()

        def run(i):
            with lock:
                starts[i] = time.monotonic()
            return fn(i)

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=num_threads)
        futures = {pool.submit(run, i): i for i in remaining}
        pending = set(futures)
        hung = 0
        while pending and hung < num_threads:
            done, pending = concurrent.futures.wait(
                pending, timeout=min(0.05, timeout_s), return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in done:
                try:
                    values[futures[future]] = float(future.result())
                except Exception:  # pylint: disable=broad-except  # a bad item scores 0
                    errors += 1
            now = time.monotonic()
            with lock:
                expired = {f for f in pending if futures[f] in starts and now - starts[futures[f]] > timeout_s}
            pending -= expired
            hung += len(expired)
            timeouts += len(expired)
        # Every worker is stuck on an abandoned item: start a fresh pool for the items not yet started.
        pool.shutdown(wait=False, cancel_futures=True)
        with lock:
            remaining = sorted(futures[f] for f in pending if futures[f] not in starts)
            running = [f for f in pending if futures[f] in starts]
        for future in running:  # Started just before the shutdown: give them their own timeout.
            try:
                values[futures[future]] = float(future.result(timeout=timeout_s))
            except concurrent.futures.TimeoutError:
                timeouts += 1
            except Exception:  # pylint: disable=broad-except
                errors += 1
    return values, timeouts, errors


class MathVerifier:
    """Batched, timeout-guarded math verifier (host side).

    Args:
      answer_mode: "boxed" (the paper's), "hash" or "auto"; see `extract_answer`.
      timeout_s: wall-time limit per response; slower items score 0.
      num_threads: worker threads.
      symbolic: allow the sympy comparison (when sympy is installed).
      max_response_chars: only the last this-many characters of a response are searched (the final
        answer is at the end), bounding the cost of pathological outputs.

    After each call `last_stats` holds {"verify_timeouts", "verify_errors", "verify_seconds"}.
    """

    def __init__(self, answer_mode: str = "boxed", timeout_s: float = 5.0, num_threads: int = 4,
                 symbolic: bool = True, max_response_chars: int = 20_000):
        if answer_mode not in ANSWER_MODES:
            raise ValueError(f"answer_mode {answer_mode!r}; allowed: {list(ANSWER_MODES)}.")
        if timeout_s <= 0 or num_threads < 1:
            raise ValueError(f"timeout_s={timeout_s} must be > 0 and num_threads={num_threads} >= 1.")
        self.answer_mode = answer_mode
        self.timeout_s = float(timeout_s)
        self.num_threads = int(num_threads)
        self.symbolic = symbolic
        self.max_response_chars = int(max_response_chars)
        self.last_stats: dict[str, float] = {}

    def score(self, response: str, reference: str) -> float:
        """1.0 if the response's final answer equals the reference, else 0.0 (no timeout)."""
        return float(verify(response[-self.max_response_chars:], reference, self.answer_mode, self.symbolic))

    def __call__(self, responses: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """Scores responses[i] against references[i] -> [len(responses)] float32 in {0, 1}."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references.")
        start = time.monotonic()
        values, timeouts, errors = run_with_timeout(
            lambda i: self.score(responses[i], references[i]), len(responses), self.timeout_s,
            self.num_threads)
        self.last_stats = {"verify_timeouts": timeouts, "verify_errors": errors,
                           "verify_seconds": time.monotonic() - start}
        return values

    def score_groups(self, responses: Sequence[Sequence[str]], references: Sequence[str]) -> np.ndarray:
        """responses [P][N] against references [P] -> rewards [P, N] float32."""
        num_samples = len(responses[0]) if len(responses) else 0
        if any(len(group) != num_samples for group in responses):
            raise ValueError("score_groups needs the same number of responses for every prompt.")
        flat = [r for group in responses for r in group]
        flat_refs = [ref for ref in references for _ in range(num_samples)]
        return self(flat, flat_refs).reshape(len(responses), num_samples)
