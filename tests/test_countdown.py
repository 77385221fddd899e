"""Tests of the Countdown task against the plain-Python reference in countdown_reference.py.

Every jitted function is built once at module scope and called with a few fixed shapes, so the file compiles
a handful of programs and runs in well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import collections
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxrl_jax.tasks import countdown as cd

try:  # tests/ on sys.path (pytest's default rootdir insertion) or tests/ as a package
    import countdown_reference as ref
except ImportError:  # pragma: no cover
    from tests import countdown_reference as ref

_generate = jax.jit(cd.generate_problems, static_argnums=(1, 2))
_verify_groups = jax.jit(cd.verify_groups)
_verify_batch = jax.jit(cd.verify_batch)
_sft_batch = jax.jit(cd.sft_batch, static_argnums=(1, 2))
_encode_prompts = jax.jit(cd.encode_prompts, static_argnums=(1,))
_decode_prompts = jax.jit(cd.decode_prompts, static_argnums=(1,))
_problem_hashes = jax.jit(cd.problem_hashes)

SPEC = cd.DEFAULT_SPEC  # 4 numbers in 1..25, targets 1..100
TINY = cd.CountdownSpec(num_numbers=3, max_number=3, max_target=10)  # a small support, for held-out tests
FUZZ_RESPONSE = 24  # longer than max_response_length(SPEC) = 16, so long junk gets through
FUZZ_PER_PROBLEM = 8
NUM_DEFAULT = 1024  # = the held-out generator's chunk, so both share one compiled program


def _numpy(problems):
    return jax.tree.map(np.asarray, problems)


def _text(tokens, length=None) -> str:
    tokens = np.asarray(tokens).tolist()
    return "".join(ref.CHARS[t] for t in (tokens if length is None else tokens[:length]))


def _problems(numbers, targets) -> cd.Problems:
    return cd.Problems(numbers=jnp.asarray(numbers, jnp.int32), target=jnp.asarray(targets, jnp.int32))


def _pad(rows, width):
    """Token lists -> int32 [len(rows), width], cut at width or padded with PAD."""
    out = np.full((len(rows), width), cd.PAD, np.int32)
    for i, row in enumerate(rows):
        row = list(row)[:width]
        out[i, : len(row)] = row
    return out


@pytest.fixture(scope="module")
def default_problems():
    """NUM_DEFAULT problems of the default spec (numpy)."""
    return _numpy(_generate(jax.random.key(0), NUM_DEFAULT, SPEC))


@pytest.fixture(scope="module")
def tiny_heldout():
    """The first 8 held-out problems of TINY (numpy) and their hash table."""
    heldout = cd.heldout_problems(TINY, 8)
    return heldout, jnp.asarray(cd.hash_table(heldout))


@pytest.fixture(scope="module")
def tiny_sft_batch(tiny_heldout):
    """An SFT batch of 512 TINY problems drawn around the TINY held-out set (numpy)."""
    return jax.tree.map(np.asarray, _sft_batch(jax.random.key(5), 512, TINY, tiny_heldout[1]))


# ----------------------------------------------------------------------------------------------------------
# Constants, specs and sizes.


def test_token_constants():
    assert (cd.PAD, cd.EOS, cd.BOS) == (ref.PAD, ref.EOS, ref.BOS)
    assert {cd.DIGIT_0 + d: str(d) for d in range(10)} | {
        cd.PLUS: "+", cd.MINUS: "-", cd.TIMES: "*", cd.DIVIDE: "/", cd.LPAREN: "(", cd.RPAREN: ")"} == ref.CHARS
    named = [cd.PAD, cd.BOS, cd.EOS, *range(cd.DIGIT_0, cd.DIGIT_9 + 1), *cd.OPERATOR_TOKENS, cd.LPAREN,
             cd.RPAREN, cd.COMMA, cd.EQUALS, cd.ANSWER]
    assert sorted(named) == list(range(22)) and cd.VOCAB_SIZE == 32


def test_sizes():
    assert (cd.prompt_length(SPEC), cd.max_solution_length(SPEC), cd.max_response_length(SPEC)) == (17, 15, 16)
    three = cd.CountdownSpec(3, 25, 100)
    assert (cd.prompt_length(three), cd.max_response_length(three)) == (14, 11)
    widest = cd.CountdownSpec(4, 99, 1000)
    assert (cd.prompt_length(widest), cd.max_response_length(widest)) == (18, 16)
    assert (cd.prompt_length(TINY), cd.max_response_length(TINY)) == (1 + 3 * (1 + 1) + 2 + 1, 3 + 2 + 2 + 1)


@pytest.mark.parametrize("fields, message", [
    (dict(num_numbers=5), r"num_numbers must be in \{3, 4\}"),
    (dict(num_numbers=2), r"num_numbers must be in \{3, 4\}"),
    (dict(num_numbers=True), "num_numbers must be a Python int"),
    (dict(max_number=0), r"max_number must be in \[1, 99\]"),
    (dict(max_number=100), r"max_number must be in \[1, 99\]"),
    (dict(max_number=25.0), "max_number must be a Python int"),
    (dict(max_target=1001), r"max_target must be in \[max_number, 1000\] = \[25, 1000\]"),
    (dict(max_target=24), r"max_target must be in \[max_number, 1000\] = \[25, 1000\]"),
    (dict(max_target="100"), "max_target must be a Python int"),
])
def test_bad_specs_raise(fields, message):
    with pytest.raises(ValueError, match=message):
        cd.CountdownSpec(**fields)


def test_bad_arguments_raise(default_problems):
    problems = _problems([[1, 2, 3, 4]], [10])
    with pytest.raises(ValueError, match=r"\[P, N, M\]"):
        cd.verify_groups(problems, jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"\[B, M\]"):
        cd.verify_batch(problems, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        cd.verify_batch(problems, jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="int32 range"):
        cd.verify_batch(problems, np.full((1, 4), 2**32 + cd.EOS, np.int64))
    with pytest.raises(ValueError, match="1 to 4 numbers"):
        cd.verify_groups(_problems([[1, 2, 3, 4, 5]], [10]), jnp.zeros((1, 1, 4), jnp.int32))
    with pytest.raises(ValueError, match="spec.num_numbers"):
        cd.encode_prompts(problems, TINY)
    with pytest.raises(ValueError, match="no solution"):
        cd.encode_targets(problems, SPEC)
    with pytest.raises(ValueError, match="prompts must have shape"):
        cd.decode_prompts(jnp.zeros((1, 16), jnp.int32), SPEC)
    with pytest.raises(ValueError, match="n must be a positive"):
        cd.generate_problems(jax.random.key(0), 0, SPEC)


# ----------------------------------------------------------------------------------------------------------
# Generation.


@pytest.mark.parametrize("which", ["default", "tiny"])
def test_generated_problems(which, default_problems, tiny_sft_batch):
    spec, problems = (SPEC, default_problems) if which == "default" else (TINY, tiny_sft_batch["problems"])
    n = len(problems.target)
    assert problems.numbers.shape == (n, spec.num_numbers) and problems.numbers.dtype == np.int32
    assert problems.target.dtype == problems.solution.dtype == problems.solution_length.dtype == np.int32
    assert problems.solution.shape == (n, cd.max_solution_length(spec))
    assert problems.numbers.min() >= 1 and problems.numbers.max() <= spec.max_number
    assert problems.target.min() >= 1 and problems.target.max() <= spec.max_target
    # Numbers are uniform over 1..max_number before acceptance; acceptance favours none so strongly that a
    # value is missing from a thousand numbers.
    assert set(problems.numbers.ravel().tolist()) == set(range(1, spec.max_number + 1))
    # The length bound is attained (all numbers of full width and K - 2 pairs of parentheses).
    assert problems.solution_length.max() == cd.max_solution_length(spec)
    for numbers, target, solution, length in zip(problems.numbers.tolist(), problems.target.tolist(),
                                                 problems.solution.tolist(), problems.solution_length.tolist()):
        text = _text(solution, length)
        assert set(solution[length:]) <= {cd.PAD}
        tree = ref.parse(text)
        assert ref.canonical_text(tree) == text, "not the minimal parenthesisation"
        assert sorted(ref.leaves(tree)) == sorted(numbers)
        assert ref.evaluate(tree) == target
        assert ref.verify(numbers, target, solution[:length] + [cd.EOS]) == 1.0


def test_generated_problems_are_solvable_by_brute_force(default_problems, tiny_sft_batch):
    for problems, count in ((default_problems, 60), (tiny_sft_batch["problems"], 512)):
        for numbers, target in zip(problems.numbers[:count].tolist(), problems.target[:count].tolist()):
            assert target in ref.reachable(tuple(sorted(numbers)))


def test_generation_covers_shapes_and_operators(default_problems):
    texts = [_text(s, n) for s, n in zip(default_problems.solution, default_problems.solution_length)]
    for char in "+-*/()":
        assert sum(char in text for text in texts) > 20, char
    shapes = collections.Counter(_shape(ref.parse(text)) for text in texts)
    assert len(shapes) == 5 and min(shapes.values()) > 50  # all Catalan(3) shapes over 4 leaves


def _shape(tree):
    return "x" if isinstance(tree, int) else (_shape(tree[1]), _shape(tree[2]))


def test_keys_determine_problems(default_problems):
    again = _numpy(_generate(jax.random.key(0), NUM_DEFAULT, SPEC))
    other = _numpy(_generate(jax.random.key(2), NUM_DEFAULT, SPEC))
    for a, b in zip(jax.tree.leaves(default_problems), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert (other.numbers != default_problems.numbers).any(axis=1).mean() > 0.99


# ----------------------------------------------------------------------------------------------------------
# Tokenisation and SFT batches.


def test_prompt_layout_by_hand():
    problems = _problems([[3, 12, 7, 20]], [72])
    prompt = np.asarray(_encode_prompts(problems, SPEC))
    assert prompt.shape == (1, cd.prompt_length(SPEC)) and prompt.dtype == np.int32
    assert cd.detokenize(prompt[0]) == "<bos>_3,12,_7,20=_72:"
    np.testing.assert_array_equal(cd.parse_text("<bos>_3,12,_7,20=_72:"), prompt[0])
    decoded = _decode_prompts(prompt, SPEC)
    assert decoded.numbers.tolist() == [[3, 12, 7, 20]] and decoded.target.tolist() == [72]
    widest = cd.CountdownSpec(4, 99, 1000)
    assert cd.detokenize(_encode_prompts(_problems([[99, 1, 10, 5]], [1000]), widest)[0]) == "<bos>99,_1,10,_5=1000:"


def test_prompt_round_trip(default_problems):
    prompts = np.asarray(_encode_prompts(jax.tree.map(jnp.asarray, default_problems), SPEC))
    assert (prompts < cd.VOCAB_SIZE).all() and (prompts[:, 0] == cd.BOS).all() and (prompts[:, -1] == cd.ANSWER).all()
    decoded = _decode_prompts(jnp.asarray(prompts), SPEC)
    np.testing.assert_array_equal(decoded.numbers, default_problems.numbers)
    np.testing.assert_array_equal(decoded.target, default_problems.target)
    for prompt, numbers, target in zip(prompts[:50], default_problems.numbers, default_problems.target):
        text = cd.detokenize(prompt).replace("_", "")
        assert text == "<bos>" + ",".join(map(str, numbers)) + f"={target}:"


def test_detokenize_parse_text_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(200):
        tokens = rng.integers(0, cd.VOCAB_SIZE + 8, size=int(rng.integers(0, 30))).astype(np.int32)
        np.testing.assert_array_equal(cd.parse_text(cd.detokenize(tokens)), tokens)
    np.testing.assert_array_equal(cd.parse_text(" (3 + 12) * 2 <eos>"), ref.text_tokens("(3+12)*2") + [cd.EOS])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        cd.parse_text("3 x 4")
    with pytest.raises(ValueError, match="unknown token"):
        cd.parse_text("<pad>")


def test_sft_batch_alignment(tiny_sft_batch):
    spec, batch_size = TINY, 512
    prompt_len, response_len = cd.prompt_length(spec), cd.max_response_length(spec)
    inputs, loss_mask, problems = tiny_sft_batch["inputs"], tiny_sft_batch["loss_mask"], tiny_sft_batch["problems"]
    assert inputs.shape == loss_mask.shape == (batch_size, prompt_len + response_len)
    assert inputs.dtype == np.int32 and loss_mask.dtype == np.bool_
    decoded = _decode_prompts(jnp.asarray(inputs[:, :prompt_len]), spec)
    np.testing.assert_array_equal(decoded.numbers, problems.numbers)
    np.testing.assert_array_equal(decoded.target, problems.target)
    assert not loss_mask[:, :prompt_len].any()
    targets, weights = inputs[:, 1:], loss_mask[:, 1:]  # logits at t predict inputs[t + 1]
    for b in range(batch_size):
        n = int(problems.solution_length[b])
        assert np.flatnonzero(weights[b]).tolist() == list(range(prompt_len - 1, prompt_len + n))
        masked = targets[b][weights[b]].tolist()
        assert masked[-1] == cd.EOS and cd.EOS not in masked[:-1] and len(masked) == n + 1
        assert (inputs[b, prompt_len + n + 1:] == cd.PAD).all()
        numbers, target = problems.numbers[b].tolist(), int(problems.target[b])
        assert ref.verify(numbers, target, inputs[b, prompt_len:].tolist()) == 1.0
        assert target in ref.reachable(tuple(sorted(numbers)))
    # The response half of every row is accepted by the verifier.
    responses = jnp.asarray(inputs[:, None, prompt_len:])  # [B, 1, R]
    rewards = np.asarray(_verify_groups(jax.tree.map(jnp.asarray, problems), responses))
    assert (rewards == 1.0).all()
    assert _sft_batch._cache_size() == 1
    # The default spec's shapes, without compiling.
    shapes = jax.eval_shape(lambda key: cd.sft_batch(key, 256, SPEC), jax.random.key(0))
    assert shapes["inputs"].shape == shapes["loss_mask"].shape == (256, 33)
    assert shapes["problems"].numbers.shape == (256, 4) and shapes["problems"].solution.shape == (256, 15)


# ----------------------------------------------------------------------------------------------------------
# Verifier.

N4 = [2, 3, 5, 7]
HAND_CASES = [
    # (name, numbers, target, response text before EOS or None for "no EOS", extra tokens, reward)
    ("solution", N4, 29, "7*5-3*2", [], 1.0),
    ("other order", N4, 29, "5*7-2*3", [], 1.0),
    ("redundant parentheses", N4, 29, "((7*5))-(3*(2))", [], 1.0),
    ("whole expression in parentheses", N4, 29, "(7*5-3*2)", [], 1.0),
    ("junk after EOS is ignored", N4, 29, "7*5-3*2", [cd.EOS, cd.LPAREN, 40, cd.BOS], 1.0),
    ("negative intermediates", N4, 10, "(2-7)*(3-5)", [], 1.0),
    ("negative exact division", [1, 7, 3, 2], 4, "2-(1-7)/3", [], 1.0),
    ("wrong target", N4, 30, "7*5-3*2", [], 0.0),
    ("no EOS", N4, 29, None, [], 0.0),
    ("missing number", N4, 32, "7*5-3", [], 0.0),
    ("reused number", N4, 29, "7*5-3-3", [], 0.0),
    ("extra number", N4, 29, "7*5-3*2+0", [], 0.0),
    ("unary minus", N4, 29, "-3*2+7*5", [], 0.0),
    ("unary minus after '('", N4, 29, "7*5+(-3*2)", [], 0.0),
    ("leading zero", N4, 29, "07*5-3*2", [], 0.0),
    ("double zero", [0, 3, 5, 7], 1, "00+3*5-7", [], 0.0),
    ("zero literal where given", [0, 2, 5, 7], 14, "0+2*7*1", [], 0.0),
    ("given zero, not all used", [0, 2, 5, 7], 9, "0+2+7", [], 0.0),
    ("given zero used", [0, 2, 5, 7], 14, "0*5+2*7", [], 1.0),
    ("unbalanced: extra ')'", N4, 29, "7*5-3*2)", [], 0.0),
    ("unbalanced: open '('", N4, 29, "(7*5-3*2", [], 0.0),
    ("empty parentheses", N4, 29, "7*5-3*2*()", [], 0.0),
    ("empty parentheses at the start", N4, 29, "()7*5-3*2", [], 0.0),
    ("trailing operator", N4, 29, "7*5-3*2-", [], 0.0),
    ("double operator", N4, 29, "7*5--3*2", [], 0.0),
    ("adjacent numbers merge", N4, 29, "75-3*2", [], 0.0),
    ("number after ')'", N4, 29, "(7)5*1-3*2", [], 0.0),
    ("'(' after a number", N4, 29, "7(5)-3*2", [], 0.0),
    ("')(' between operands", N4, 29, "(7*5)(3*2)", [], 0.0),
    ("empty response", N4, 29, "", [], 0.0),
    ("PAD inside", N4, 29, "7*5-3*2", "pad inside", 0.0),
    ("prompt token inside", N4, 29, "7*5-3*2", "comma inside", 0.0),
    ("division by zero", [5, 5, 2, 3], 3, "2/(5-5)+3", [], 0.0),
    ("zero divided is fine", [5, 5, 2, 3], 3, "(5-5)/2+3", [], 1.0),
    ("inexact division whose rational value is the target", [3, 6, 4, 1], 2, "3/6*4*1", [], 0.0),
    ("exact division", [6, 3, 4, 1], 9, "6/3*4+1", [], 1.0),
    ("left-associative division", [8, 4, 2, 1], 1, "8/4/2*1", [], 1.0),
    ("left-associative division, not right", [8, 4, 2, 1], 4, "8/4/2*1", [], 0.0),
    ("left-associative subtraction", [8, 4, 2, 1], 1, "8-4-2-1", [], 1.0),
    ("precedence", [1, 2, 4, 8], 1, "1+2*4-8", [], 1.0),
    ("precedence, not left to right", [1, 2, 4, 8], 4, "1+2*4-8", [], 0.0),
    ("largest values", [99, 99, 99, 99], 99**4, "99*99*99*99", [], 1.0),
    ("five operands that would overflow", [99, 99, 99, 99], int(np.int32(np.uint32(99**5 % 2**32))),
     "99*99*99*99*99", [], 0.0),
    ("literal 2^32 + 29", N4, 29, "4294967325", [], 0.0),
    ("literal 2^32 + 7 reused", N4, 29, "4294967303*5-3*2", [], 0.0),
    ("three-digit literal", [10, 3, 5, 7], 115, "100+3*5", [], 0.0),
    ("huge literal times zero", [0, 3, 5, 7], 15, "99999999999*0+3*5", [], 0.0),
]


def _hand_response(text, extra):
    if extra == "pad inside":
        tokens = ref.text_tokens(text)
        return tokens[:3] + [cd.PAD] + tokens[3:] + [cd.EOS]
    if extra == "comma inside":
        tokens = ref.text_tokens(text)
        return tokens[:3] + [cd.COMMA] + tokens[3:] + [cd.EOS]
    if text is None:
        return ref.text_tokens("7*5-3*2") + [cd.PAD] * 4
    return ref.text_tokens(text) + [cd.EOS] + list(extra)


def test_verifier_hand_cases():
    cases = HAND_CASES
    responses = _pad([_hand_response(case[3], case[4]) for case in cases], FUZZ_RESPONSE)
    problems = _problems([case[1] for case in cases], [case[2] for case in cases])
    rewards = np.asarray(_verify_batch(problems, jnp.asarray(responses)))
    assert rewards.dtype == np.float32 and rewards.shape == (len(cases),)
    for case, response, reward in zip(cases, responses.tolist(), rewards.tolist()):
        name, numbers, target, _, _, expected = case
        assert ref.verify(numbers, target, response) == expected, f"reference disagrees with the rules: {name}"
        assert reward == expected, name


def test_numbers_above_the_spec_limit_are_never_matched():
    """A documented limit: literals above MAX_NUMBER_LIMIT = 99 are rejected, so a hand-made problem with a
    larger number cannot be solved (no valid spec has one; the plain rules would accept this response)."""
    response = _pad([ref.text_tokens("100+3*5-7") + [cd.EOS]], FUZZ_RESPONSE)
    assert ref.verify([100, 3, 5, 7], 108, response[0].tolist()) == 1.0
    assert np.asarray(_verify_batch(_problems([[100, 3, 5, 7]], [108]), jnp.asarray(response))).tolist() == [0.0]


def test_verify_single_response_with_three_numbers():
    verify_one = jax.jit(cd.verify)
    problem = cd.Problems(numbers=jnp.asarray([4, 6, 8], jnp.int32), target=jnp.int32(6))
    for text, expected in (("8-6+4", 1.0), ("8+4-6", 1.0), ("(8-6)*4", 0.0), ("6/(8-4)", 0.0), ("8-6", 0.0),
                           ("8-6+4+4", 0.0), ("(8-6+4)", 1.0)):
        response = _pad([ref.text_tokens(text) + [cd.EOS]], 12)[0]
        assert ref.verify([4, 6, 8], 6, response.tolist()) == expected, text
        assert float(verify_one(problem, jnp.asarray(response))) == expected, text
    assert verify_one._cache_size() == 1


# Fuzzing: random and adversarial responses.

_EXPR_ALPHABET = list(ref.CHARS)
_JUNK = [cd.PAD, cd.BOS, cd.COMMA, cd.EQUALS, cd.ANSWER, 25, 31, 40]


def _random_tree(rng, numbers):
    order = [int(x) for x in rng.permutation(numbers)]

    def build(items):
        if len(items) == 1:
            return items[0]
        split = int(rng.integers(1, len(items)))
        return ("+-*/"[int(rng.integers(4))], build(items[:split]), build(items[split:]))

    return build(order)


def _render(rng, tree):
    """Canonical, fully parenthesised, or canonical with random redundant parentheses."""
    style = rng.integers(3)
    if style == 0:
        return ref.canonical_text(tree)
    if style == 1:
        return ref.full_text(tree)

    def extra(t):
        text = str(t) if isinstance(t, int) else None
        if text is None:
            left, right = extra(t[1]), extra(t[2])
            if not isinstance(t[1], int) and ref.PRECEDENCE[t[1][0]] < ref.PRECEDENCE[t[0]]:
                left = f"({left})"
            if not isinstance(t[2], int) and ref.PRECEDENCE[t[2][0]] <= ref.PRECEDENCE[t[0]]:
                right = f"({right})"
            text = left + t[0] + right
        return f"({text})" if rng.random() < 0.25 else text

    return extra(tree)


def _mutate(rng, tokens):
    tokens = list(tokens)
    for _ in range(int(rng.integers(1, 3))):
        kind = rng.integers(4)
        position = int(rng.integers(len(tokens) + 1))
        new = int(rng.choice(_EXPR_ALPHABET + [cd.EOS] + _JUNK))
        if kind == 0 and tokens:
            del tokens[min(position, len(tokens) - 1)]
        elif kind == 1:
            tokens.insert(position, new)
        elif kind == 2 and tokens:
            tokens[min(position, len(tokens) - 1)] = new
        elif len(tokens) >= 2:
            i = min(position, len(tokens) - 2)
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
    return tokens


def _fuzz_response(rng, numbers, target, solution_text):
    """One random or adversarial response as a token list (the caller pads or cuts it)."""
    eos = [cd.EOS]
    kind = int(rng.integers(10))
    if kind == 0:  # the canonical solution, sometimes with junk after EOS
        tail = [int(rng.choice(_EXPR_ALPHABET + _JUNK)) for _ in range(int(rng.integers(0, 4)))]
        return ref.text_tokens(solution_text) + eos + tail
    if kind == 1:  # the solution's tree with its numbers permuted
        tree = ref.parse(solution_text)
        values = iter(rng.permutation(ref.leaves(tree)).tolist())

        def relabel(t):
            return next(values) if isinstance(t, int) else (t[0], relabel(t[1]), relabel(t[2]))

        return ref.text_tokens(_render(rng, relabel(tree))) + eos
    if kind == 2:  # one literal replaced: by a reused given number, a random or huge literal, or with a leading 0
        spans = [m.span() for m in re.finditer(r"[0-9]+", solution_text)]
        start, end = spans[int(rng.integers(len(spans)))]
        literal, choice = solution_text[start:end], rng.integers(4)
        new = (str(rng.choice(numbers)) if choice == 0 else str(rng.integers(0, 130)) if choice == 1
               else str(rng.integers(10**9, 10**12)) if choice == 2 else "0" + literal)
        return ref.text_tokens(solution_text[:start] + new + solution_text[end:]) + eos
    if kind in (3, 4):  # random expressions over the given numbers; many of rational value = target or 1/0
        trees = [_random_tree(rng, numbers) for _ in range(1 if kind == 3 else 60)]
        if rng.random() < 0.3:  # prefer a division by zero
            hits = [t for t in trees if ref.rational_value(t) is None]
        else:
            hits = [t for t in trees if ref.rational_value(t) == target]
        tree = hits[0] if hits else trees[0]
        return ref.text_tokens(_render(rng, tree)) + eos
    if kind == 5:  # token-level mutations of the solution
        return _mutate(rng, ref.text_tokens(solution_text) + eos)
    if kind == 6:  # no EOS
        return ref.text_tokens(solution_text)[: int(rng.integers(0, len(solution_text) + 1))]
    if kind == 7:  # token soup over the expression alphabet, usually ended by EOS
        soup = [int(rng.choice(_EXPR_ALPHABET)) for _ in range(int(rng.integers(0, 12)))]
        return soup + (eos if rng.random() < 0.8 else [])
    if kind == 8:  # structural damage: unary minus, empty parentheses, dangling operator or parenthesis
        tokens = ref.text_tokens(solution_text)
        damage = rng.integers(5)
        if damage == 0:
            tokens = [cd.MINUS] + tokens
        elif damage == 1:
            i = int(rng.integers(len(tokens) + 1))
            tokens = tokens[:i] + [cd.LPAREN, cd.RPAREN] + tokens[i:]
        elif damage == 2:
            tokens = tokens + [int(rng.choice(cd.OPERATOR_TOKENS))]
        elif damage == 3:
            i = int(rng.integers(len(tokens) + 1))
            tokens = tokens[:i] + [int(rng.choice([cd.LPAREN, cd.RPAREN]))] + tokens[i:]
        else:
            tokens = [cd.LPAREN] + tokens + [cd.RPAREN]  # still valid
        return tokens + eos
    # kind 9: wrong multisets: a number dropped or one reused
    values = list(numbers)
    if rng.random() < 0.5 and len(values) > 1:
        values.pop(int(rng.integers(len(values))))
    else:
        values.append(int(rng.choice(values)))
    return ref.text_tokens(_render(rng, _random_tree(rng, values))) + eos


def _small_number_problems(rng, count):
    """`count` problems of 4 numbers in 1..5 (duplicates, zero subexpressions), targets in 1..20, made here from
    random expression trees: (numbers [count, 4], targets [count], canonical solution texts)."""
    numbers, targets, solutions = [], [], []
    while len(targets) < count:
        values = rng.integers(1, 6, size=4).tolist()
        tree = _random_tree(rng, values)
        try:
            value = ref.evaluate(tree)
        except ref.Invalid:
            continue
        if 1 <= value <= 20:
            numbers.append(values)
            targets.append(int(value))
            solutions.append(ref.canonical_text(tree))
    return np.asarray(numbers), np.asarray(targets), solutions


@pytest.fixture(scope="module")
def fuzz_batch(default_problems):
    """(numbers [P, 4], targets [P], responses int32 [P, 8, 24]): all 1024 default-spec problems (slot 0 holds
    each one's generated solution) and 256 small-number problems."""
    rng = np.random.default_rng(3)
    small_numbers, small_targets, small_solutions = _small_number_problems(rng, 256)
    numbers = np.concatenate([default_problems.numbers, small_numbers])
    targets = np.concatenate([default_problems.target, small_targets])
    solutions = [_text(s, n) for s, n in zip(default_problems.solution, default_problems.solution_length)]
    solutions += small_solutions
    rows = []
    for nums, target, solution in zip(numbers.tolist(), targets.tolist(), solutions):
        group = [ref.text_tokens(solution) + [cd.EOS]]  # slot 0: the canonical solution itself
        group += [_fuzz_response(rng, nums, target, solution) for _ in range(FUZZ_PER_PROBLEM - 1)]
        rows.append(_pad(group, FUZZ_RESPONSE))
    return numbers, targets, np.stack(rows)


def test_verifier_matches_reference_on_fuzzed_responses(fuzz_batch):
    numbers, targets, responses = fuzz_batch
    rewards = np.asarray(_verify_groups(_problems(numbers, targets), jnp.asarray(responses)))
    assert rewards.shape == responses.shape[:2] and rewards.dtype == np.float32
    reasons = np.array([[ref.check(n, t, r) for r in group] for n, t, group in
                        zip(numbers.tolist(), targets.tolist(), responses.tolist())])
    expected = (reasons == "ok").astype(np.float32)
    mismatches = np.argwhere(rewards != expected)
    assert mismatches.size == 0, (
        f"{len(mismatches)} mismatches, first: numbers {numbers[mismatches[0][0]].tolist()}, target "
        f"{targets[mismatches[0][0]]}, response {cd.detokenize(responses[tuple(mismatches[0])])!r}, got "
        f"{rewards[tuple(mismatches[0])]}, reference: {reasons[tuple(mismatches[0])]}")
    assert (rewards[:, 0] == 1.0).all()  # every generated solution (and every small-number one) verifies
    counts = collections.Counter(reasons.ravel().tolist())
    minimum = {"ok": 1500, "wrong value": 300, "numbers differ": 300, "malformed": 300, "no EOS": 300,
               "foreign token": 50, "leading zero": 20, "division by zero": 20, "inexact division": 100}
    assert set(counts) == set(minimum) and all(counts[r] >= m for r, m in minimum.items()), counts
    # Adversarial: inexact divisions whose rational value is the target anyway (e.g. 3/6*4 = 2).
    fooling = 0
    for n, t, group, why in zip(numbers.tolist(), targets.tolist(), responses.tolist(), reasons):
        for response, reason in zip(group, why):
            if reason == "inexact division":
                fooling += ref.rational_value(ref.parse(ref.response_text(response))) == t
    assert fooling >= 20


def test_verifier_agrees_with_brute_force_solver():
    """K = 3 numbers in 1..4: every expression tree (fully parenthesised) against every target in 1..40.

    The reward of each (problem, expression) must be [exact value == target]; a problem is solved by some
    expression iff the brute-force solver reaches its target.
    """
    multisets = list(itertools.combinations_with_replacement(range(1, 5), 3))  # 20
    targets = list(range(1, 41))
    trees = {m: list(ref.all_trees(m)) for m in multisets}  # 192 each
    values = {}
    for m, ts in trees.items():
        for tree in ts:
            try:
                values[m, ref.full_text(tree)] = ref.evaluate(tree)
            except ref.Invalid:
                values[m, ref.full_text(tree)] = None
    texts = {m: [ref.full_text(t) for t in ts] for m, ts in trees.items()}
    width = max(len(t) for ts in texts.values() for t in ts) + 1
    groups = {m: _pad([ref.text_tokens(x) + [cd.EOS] for x in texts[m]], width) for m in multisets}
    problems = [(m, t) for m in multisets for t in targets]
    responses = np.stack([groups[m] for m, _ in problems])  # [800, 192, 12]
    rewards = np.asarray(_verify_groups(_problems([m for m, _ in problems], [t for _, t in problems]),
                                        jnp.asarray(responses)))
    for row, (m, t) in zip(rewards, problems):
        expected = np.array([values[m, x] == t for x in texts[m]], np.float32)
        np.testing.assert_array_equal(row, expected)
        assert row.any() == (t in ref.reachable(tuple(sorted(m))))
    assert 0.2 < rewards.any(axis=1).mean() < 0.9


# ----------------------------------------------------------------------------------------------------------
# Held-out problems.


def test_problem_hashes_are_order_insensitive_and_injective():
    rng = np.random.default_rng(4)
    numbers = rng.integers(1, 100, size=(500, 4))
    targets = rng.integers(0, 1001, size=500)
    # The multiset ranks are a bijection onto [0, C(M + K - 1, K)) for numbers in 1..M (checked for all
    # multisets up to M = 40 (K = 3) and M = 25 (K = 4) here; the corner is the largest rank of M = 99, K = 4).
    triples = np.asarray(list(itertools.combinations_with_replacement(range(1, 41), 3)))
    quadruples = np.asarray(list(itertools.combinations_with_replacement(range(1, 26), 4)))
    corner = np.asarray([[99, 99, 99, 99], [99, 99, 99, 99]])
    rows = np.concatenate([numbers, rng.permuted(numbers, axis=1), quadruples, corner])
    row_targets = np.concatenate([targets, targets, np.zeros(len(quadruples), int), [1000, 999]])
    hashes = np.asarray(_problem_hashes(_problems(rows, row_targets)))
    assert hashes.dtype == np.uint32
    np.testing.assert_array_equal(hashes[:500], hashes[500:1000])  # the order of the numbers does not matter
    assert sorted((hashes[1000:-2] // 1001).tolist()) == list(range(len(quadruples)))
    assert hashes[-2:].tolist() == [4249574 * 1001 + 1000, 4249574 * 1001 + 999]  # < 2^32
    triple_hashes = np.asarray(_problem_hashes(_problems(triples, np.zeros(len(triples), int))))
    assert sorted((triple_hashes // 1001).tolist()) == list(range(len(triples)))
    assert cd.hash_table(_problems(numbers, targets)).tolist() == sorted(set(hashes[:500].tolist()))


def test_heldout_set_is_deterministic(tiny_heldout):
    heldout, _ = tiny_heldout
    assert heldout.numbers.shape == (8, 3)
    np.testing.assert_array_equal(cd.heldout_problems(TINY, 5).numbers, heldout.numbers[:5])  # a prefix
    identities = {(tuple(sorted(n)), t) for n, t in zip(heldout.numbers.tolist(), heldout.target.tolist())}
    assert len(identities) == 8
    for numbers, target, solution, length in zip(heldout.numbers.tolist(), heldout.target.tolist(),
                                                 heldout.solution.tolist(), heldout.solution_length.tolist()):
        assert ref.verify(numbers, target, solution[:length] + [cd.EOS]) == 1.0
    other_seed = cd.heldout_problems(TINY, 8, seed=1)
    assert not np.array_equal(other_seed.numbers, heldout.numbers)


def test_training_draws_never_yield_heldout_problems(tiny_heldout, tiny_sft_batch):
    heldout, table = tiny_heldout
    identities = {(tuple(sorted(n)), t) for n, t in zip(heldout.numbers.tolist(), heldout.target.tolist())}
    share = cd.heldout_mass(heldout, TINY, num_draws=1024)
    assert 0.05 < share < 0.6  # a large share, so that many first draws are held out
    problems = tiny_sft_batch["problems"]
    drawn = {(tuple(sorted(n)), t) for n, t in zip(problems.numbers.tolist(), problems.target.tolist())}
    assert not drawn & identities
    assert int(cd.count_in_table(jax.tree.map(jnp.asarray, problems), table)) == 0
    assert int(tiny_sft_batch["redraws"]) >= 0.5 * share * 512  # about share * 512 first draws were redrawn
    # The default spec's held-out set takes a tiny share of its distribution.
    assert cd.heldout_mass(cd.heldout_problems(SPEC, 200), SPEC, num_draws=1024) < 0.01
