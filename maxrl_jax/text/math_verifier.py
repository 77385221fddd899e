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
their content), braces around the whole answer ("{5}", as in "\boxed{{5}}"), degree signs, "%" and "\%",
currency "$", a trailing period, a leading "x =" (one variable), units after a number ("12 cm",
"5\text{ dollars}" -> the number), thousands separators ("1,234,567", "1{,}000") and spaces;
\dfrac/\tfrac -> \frac; "\frac12" -> "\frac{1}{2}"; "(B)" -> "B".

Comparison (`is_equivalent`), first match wins:
  0. the raw answer equals the raw reference; otherwise an answer longer than 1,000 characters or nested
     deeper than 20 brackets scores 0 at once (no normalisation, no sympy);
  1. equal normalised strings;
  2. both parse as exact rational numbers (integers, decimals, scientific notation up to 1e+-100, a/b,
     \frac{a}{b}, mixed numbers 2\frac{1}{2}, signs) and are equal: "5.00" == "5", "0.5" == "1/2";
  3. both are tuples / intervals with the same brackets (or plain comma lists) of equal length, compared
     element by element;
  4. (symbolic=True and sympy installed) both convert to short sympy expressions (at most 80 characters:
     only digits, + - * / ^, parentheses, \frac, \sqrt, \pi, \cdot, single-letter variables and a few
     function names; no power of a power, no number in an exponent above 100, no literal of 7 digits or
     more; nothing else is ever evaluated) and sympy.simplify(a - b) == 0.
  Anything else, a parse error or an exception is 0.

Time and memory: `MathVerifier` (the trainer's entry point) runs step 4 in worker processes
(maxrl_jax.text.symbolic_worker): a comparison that outlives `timeout_s` has its worker killed, and each
worker's address space is capped (`memory_limit_mb`), so no abandoned computation keeps a core or memory
busy. Steps 0-3 run in the calling process and are cheap (bounded input sizes). Plain string-equal and
numeric answers never start a worker. The module-level `verify` / `is_equivalent` run step 4 in-process
without a timeout: use them on trusted inputs (tests, references), `MathVerifier` on model outputs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import fractions
import importlib.util
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from maxrl_jax.text import symbolic_worker

ANSWER_MODES = ("boxed", "hash", "auto")
_MAX_EXPONENT = 100  # Decimal exponents beyond this do not parse as numbers.
_MAX_ANSWER_CHARS = 1000  # Longer extracted answers score 0 unless equal to the reference as written.
_MAX_NESTING = 20  # Deeper bracket nesting ({, (, [) scores 0 likewise.
_MAX_SYMBOLIC_CHARS = 80  # Longer answers skip the symbolic comparison.
_MAX_SYMBOLIC_EXPONENT = 100  # Numbers above this inside an exponent skip the symbolic comparison.


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


def too_complex(answer: str) -> bool:
    """Whether an extracted answer is refused unread: longer than 1,000 characters or nested deeper than 20
    brackets. A linear scan; it runs before the normalisation, whose cost grows with the nesting."""
    if len(answer) > _MAX_ANSWER_CHARS:
        return True
    depth = 0
    for ch in answer:
        if ch in "{([":
            depth += 1
            if depth > _MAX_NESTING:
                return True
        elif ch in "})]":
            depth -= 1
    return False


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
    while s.startswith("{") and _matching_brace(s, 0) == len(s) - 1:  # "\boxed{{5}}" -> "5"
        s = s[1:-1].strip()
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


_SYMPY_FUNCTIONS = symbolic_worker.ALLOWED_NAMES


def _exponent_too_large(source: str, max_exponent: float) -> bool:
    """Whether a number in the exponent of some "**" (its bracketed group, or the number right after it)
    exceeds max_exponent: (x+1)**99999 is refused before sympy expands it."""
    for match in re.finditer(r"\*\*\s*", source):
        rest = source[match.end():]
        if rest.startswith("("):
            depth, end = 0, len(rest)
            for i, ch in enumerate(rest):
                depth += (ch == "(") - (ch == ")")
                if depth == 0:
                    end = i + 1
                    break
            exponent = rest[:end]
        else:
            exponent = re.match(r"[-+]?[0-9.]*", rest).group(0)
        if any(float(number) > max_exponent for number in re.findall(r"\d+(?:\.\d*)?", exponent)):
            return True
    return False


def _latex_to_sympy(s: str, max_exponent: float = _MAX_SYMBOLIC_EXPONENT) -> str | None:
    r"""A restricted latex -> sympy source conversion; None when anything unknown remains or it is too
    large to expand safely (see the module docstring)."""
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
    if _exponent_too_large(s, max_exponent):
        return None
    return s


_HAS_SYMPY = importlib.util.find_spec("sympy") is not None


def _symbolic_equal(a: str, b: str) -> bool:
    """In-process sympy comparison of two normalised answers (no timeout; MathVerifier uses workers)."""
    source_a, source_b = _latex_to_sympy(a), _latex_to_sympy(b)
    if not _HAS_SYMPY or source_a is None or source_b is None:
        return False
    return symbolic_worker.symbolic_equal(source_a, source_b)


# ----------------------------------------------------------------------------------------------------------
# Comparison.
# ----------------------------------------------------------------------------------------------------------


def _equivalent_normalized(p: str, g: str, symbolic: Callable[[str, str], bool] | None,
                           depth: int = 0) -> bool:
    """Steps 1-4 of the module docstring on normalised strings; `symbolic` (or None) is step 4."""
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
    return symbolic is not None and symbolic(p, g)


def is_equivalent(prediction: str | None, reference: str, symbolic: bool = True) -> bool:
    """Whether an extracted answer equals the reference answer (see the module docstring).

    sympy (symbolic=True) runs in this process without a timeout: for model outputs use MathVerifier.
    """
    if prediction is None:
        return False
    if prediction.strip() and prediction.strip() == str(reference).strip():
        return True
    if too_complex(prediction):
        return False
    return _equivalent_normalized(normalize_answer(prediction), normalize_answer(reference),
                                  _symbolic_equal if symbolic else None)


def verify(response: str, reference: str, answer_mode: str = "boxed", symbolic: bool = True) -> bool:
    """Extracts the final answer of `response` and compares it with `reference` (no timeout)."""
    return is_equivalent(extract_answer(response, answer_mode), reference, symbolic)


def canonical_answer(response: str, answer_mode: str = "boxed") -> str | None:
    """A key for majority voting: the normalised extracted answer (numbers as reduced fractions); None when
    there is none or it is refused by `too_complex`."""
    answer = extract_answer(response, answer_mode)
    if answer is None or too_complex(answer):
        return None
    normalized = normalize_answer(answer)
    if not normalized:
        return None
    number = parse_number(normalized)
    return str(number) if number is not None else normalized


# ----------------------------------------------------------------------------------------------------------
# Batches, with sympy in killable worker processes.
# ----------------------------------------------------------------------------------------------------------


class _Deferred(Exception):
    """Raised by the first pass when an item needs a sympy comparison that is not cached yet."""


class _TimedOut(Exception):
    """A sympy comparison ran out of time (its worker was killed)."""


class MathVerifier:
    """Batched math verifier for model outputs (host side), bounded in time and memory.

    Each response is scored in two passes. The first, in the calling thread, extracts the answer, refuses
    oversized ones (`too_complex`) and tries the cheap comparisons (steps 0-3 of the module docstring);
    plain string-equal and numeric answers end here and never need sympy. The distinct (answer, reference)
    pairs left for sympy are then compared on `num_threads` threads, each sending its comparisons to one
    of up to `num_threads` worker processes (maxrl_jax.text.symbolic_worker). A pair whose comparisons take
    longer than `timeout_s` in all scores 0: its worker is killed and reaped before the call returns, so
    nothing keeps running. Workers start on first use and are kept for later calls; `close()` (or the end
    of the interpreter) stops them. Definite sympy results are cached (up to `cache_size` pairs).

    Args:
      answer_mode: "boxed" (the paper's), "hash" or "auto"; see `extract_answer`.
      timeout_s: sympy wall time allowed per response (worker start-up excluded); slower ones score 0.
      num_threads: threads, and at most this many worker processes.
      symbolic: allow the sympy comparison (when sympy is installed).
      max_response_chars: only the last this-many characters of a response are searched (the final
        answer is at the end), bounding the cost of pathological outputs.
      memory_limit_mb: address-space limit of each worker process (RLIMIT_AS), MiB; 0: none.
      max_symbolic_exponent: numbers above this inside an exponent skip sympy (scored by steps 0-3 only).
      cache_size: sympy results remembered across calls.

    After each call `last_stats` holds {"verify_timeouts", "verify_errors", "verify_refused",
    "verify_symbolic", "verify_seconds"}: responses scored 0 by the timeout, by an exception, by
    `too_complex`; distinct pairs sent to sympy; the call's wall time.
    """

    def __init__(self, answer_mode: str = "boxed", timeout_s: float = 5.0, num_threads: int = 4,
                 symbolic: bool = True, max_response_chars: int = 20_000, memory_limit_mb: int = 1024,
                 max_symbolic_exponent: float = _MAX_SYMBOLIC_EXPONENT, cache_size: int = 65536):
        if answer_mode not in ANSWER_MODES:
            raise ValueError(f"answer_mode {answer_mode!r}; allowed: {list(ANSWER_MODES)}.")
        if timeout_s <= 0 or num_threads < 1:
            raise ValueError(f"timeout_s={timeout_s} must be > 0 and num_threads={num_threads} >= 1.")
        self.answer_mode = answer_mode
        self.timeout_s = float(timeout_s)
        self.num_threads = int(num_threads)
        self.symbolic = bool(symbolic) and _HAS_SYMPY
        self.max_response_chars = int(max_response_chars)
        self.max_symbolic_exponent = max_symbolic_exponent
        self.pool = symbolic_worker.WorkerPool(self.num_threads, memory_limit_mb)
        self._cache: collections.OrderedDict[tuple[str, str], bool] = collections.OrderedDict()
        self._cache_size = int(cache_size)
        self._cache_lock = threading.Lock()
        self._warned = False
        self.last_stats: dict[str, float] = {}

    # -------------------------------------------------------------------- sympy through the workers

    def _sources(self, p: str, g: str) -> tuple[str, str] | None:
        source_p = _latex_to_sympy(p, self.max_symbolic_exponent)
        source_g = _latex_to_sympy(g, self.max_symbolic_exponent) if source_p is not None else None
        return None if source_g is None else (source_p, source_g)

    def _cached(self, p: str, g: str) -> bool:
        """First pass: a cached sympy result, False when sympy cannot apply, else _Deferred."""
        sources = self._sources(p, g)
        if sources is None:
            return False
        with self._cache_lock:
            if sources in self._cache:
                self._cache.move_to_end(sources)
                return self._cache[sources]
        raise _Deferred()

    def _compare_pair(self, p: str, g: str) -> tuple[bool, bool]:
        """Second pass for one normalised pair -> (equal, timed out)."""
        deadline = time.monotonic() + self.timeout_s

        def symbolic(a: str, b: str) -> bool:
            sources = self._sources(a, b)
            if sources is None:
                return False
            with self._cache_lock:
                if sources in self._cache:
                    return self._cache[sources]
            result = self.pool.compare(*sources, timeout_s=max(deadline - time.monotonic(), 0.0))
            if result is None:
                raise _TimedOut()
            if self.pool.unavailable is None:
                with self._cache_lock:
                    self._cache[sources] = result
                    while len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
            return result

        try:
            return _equivalent_normalized(p, g, symbolic), False
        except _TimedOut:
            return False, True

    # -------------------------------------------------------------------- scoring

    def _first_pass(self, response: str, reference: str, seen: dict, references: dict) -> float | str | tuple:
        """1.0 / 0.0, "refused", or the normalised (answer, reference) pair that needs sympy.

        `seen` memoises outcomes per (answer, reference) within a call (a group's rollouts often share their
        answer), `references` the normalised references.
        """
        answer = extract_answer(response[-self.max_response_chars:], self.answer_mode)
        if answer is None:
            return 0.0
        key = (answer, reference)
        if key not in seen:
            seen[key] = self._compare_cheaply(answer, reference, references)
        return seen[key]

    def _compare_cheaply(self, answer: str, reference: str, references: dict) -> float | str | tuple:
        if answer.strip() and answer.strip() == str(reference).strip():
            return 1.0
        if too_complex(answer):
            return "refused"
        if reference not in references:
            references[reference] = normalize_answer(reference)
        p, g = normalize_answer(answer), references[reference]
        try:
            return float(_equivalent_normalized(p, g, self._cached if self.symbolic else None))
        except _Deferred:
            return (p, g)

    def __call__(self, responses: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """Scores responses[i] against references[i] -> [len(responses)] float32 in {0, 1}."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references.")
        start = time.monotonic()
        values = np.zeros(len(responses), np.float32)
        errors = refused = timeouts = 0
        deferred: dict[tuple[str, str], list[int]] = {}
        seen: dict[tuple[str, str], float | str | tuple] = {}
        normalized_references: dict[str, str] = {}
        for i, (response, reference) in enumerate(zip(responses, references)):
            try:
                outcome = self._first_pass(response, reference, seen, normalized_references)
            except Exception:  # pylint: disable=broad-except  # a bad item scores 0
                errors += 1
                continue
            if outcome == "refused":
                refused += 1
            elif isinstance(outcome, tuple):
                deferred.setdefault(outcome, []).append(i)
            else:
                values[i] = outcome
        if deferred:
            pairs = list(deferred)
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(self.num_threads, len(pairs))) as threads:
                results = list(threads.map(lambda pair: self._compare_pair(*pair), pairs))
            for pair, (equal, timed_out) in zip(pairs, results):
                values[deferred[pair]] = float(equal)
                timeouts += len(deferred[pair]) if timed_out else 0
            if self.pool.unavailable and not self._warned:
                self._warned = True
                logging.warning("Math verifier: sympy comparisons are off (%s); only steps 0-3 apply.",
                                self.pool.unavailable)
        self.last_stats = {"verify_timeouts": timeouts, "verify_errors": errors, "verify_refused": refused,
                           "verify_symbolic": len(deferred), "verify_seconds": time.monotonic() - start}
        return values

    def score(self, response: str, reference: str) -> float:
        """1.0 if the response's final answer equals the reference, else 0.0 (one-item call)."""
        return float(self([response], [reference])[0])

    def score_groups(self, responses: Sequence[Sequence[str]], references: Sequence[str]) -> np.ndarray:
        """responses [P][N] against references [P] -> rewards [P, N] float32."""
        num_samples = len(responses[0]) if len(responses) else 0
        if any(len(group) != num_samples for group in responses):
            raise ValueError("score_groups needs the same number of responses for every prompt.")
        flat = [r for group in responses for r in group]
        flat_refs = [ref for ref in references for _ in range(num_samples)]
        return self(flat, flat_refs).reshape(len(responses), num_samples)

    def close(self) -> None:
        """Stops the worker processes (a later call starts new ones)."""
        self.pool.close()
        self.pool = symbolic_worker.WorkerPool(self.pool.size, self.pool.memory_limit_mb)

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
