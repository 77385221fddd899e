"""The Countdown task: random solvable instances with a solution, tokenisation, an exact verifier, and the Task.

The whole task is this one file (configs/countdown.py runs it): the environment's pure, jittable functions,
then `CountdownTask`, what the RL trainer (maxrl_jax/trainers/rl.py) needs of it (docs/architecture.md).

Countdown: given K = 3 or 4 numbers and a target, write an arithmetic expression with +, -, *, / and
parentheses that uses each given number exactly once and evaluates to the target. Like the maze task this is an
"infinite data" environment: every function here is a pure, jittable JAX function of explicit PRNG keys, with
the task parameters (`CountdownSpec`) static.

Rules (those of `verify`):
  * an expression is a well-formed infix expression over decimal number literals, the binary operators
    + - * / and balanced parentheses; no unary minus, no leading zeros ('07'), no empty parentheses, no two
    operands or two operators in a row. Redundant (non-empty) parentheses such as '(3)' or '((2+3))*4' are
    allowed;
  * standard precedence: * and / bind tighter than + and -, all four are left-associative;
  * the multiset of literals equals the multiset of the given numbers (each given number used exactly once);
  * every '/' divides exactly: a non-zero divisor and remainder 0 (so every value is an integer; negative
    intermediate values are allowed);
  * the value equals the target.

Tokens (vocabulary of 32 to match the maze's; ids 22..31 are reserved and never produced):

    PAD 0, BOS 1, EOS 2, DIGIT_0..DIGIT_9 3..12 (digit d = DIGIT_0 + d),
    PLUS 13, MINUS 14, TIMES 15, DIVIDE 16, LPAREN 17, RPAREN 18, COMMA 19, EQUALS 20, ANSWER 21.

Prompt ([prompt_length(spec)] = K (W + 1) + Wt + 2 tokens, W = digits of max_number, Wt = digits of
max_target; 17 for the default spec):

    BOS  n_1 , n_2 , ... , n_K  =  target  ANSWER        e.g.  <bos>_3,12,_7,20=_72:

Every number takes exactly W slots and the target Wt slots, right-aligned and left-padded with PAD ('_' in
`detokenize`), so the units digit of every number sits at a fixed position. The numbers appear in the order
of `Problems.numbers` (random, unrelated to their order in the solution).

Response: the expression's tokens, then EOS (the sampler's stop token), padded with PAD. The verifier reads
the tokens before the first EOS; a response without EOS scores 0.

SFT batches (`sft_batch`) have the maze's layout: `inputs` [B, Lp + R] = prompt, solution, EOS, PAD..., and a
bool `loss_mask` [B, Lp + R] that is True exactly on the solution tokens and the EOS; a next-token trainer
uses `logits = model(inputs[:, :-1])`, `targets = inputs[:, 1:]`, `weights = loss_mask[:, 1:]`, so the first
response token is predicted from ANSWER.

Canonical solutions. `generate_problems` draws a random expression tree and writes it in infix with the
fewest parentheses that make it parse back to the same tree: a child is parenthesised iff it is an
operator node and either it is the left child and binds weaker than its parent ((a+b)*c), or it is the right
child and binds weaker than or as weakly as its parent (a-(b+c), a/(b*c), a+(b+c)). Leaves and the root are
never parenthesised, so a solution has at most K - 2 pairs; its length is at most
`max_solution_length(spec)` = K W + (K - 1) + 2 (K - 2).

Integer overflow. Every value here is computed in int32 and never overflows. Claim: a node of a valid
expression tree whose subtree has k leaves, each a given number in [0, 99], has |value| <= 99^k. Induction:
a leaf is <= 99; for children with a, b >= 1 leaves and |x| <= 99^a, |y| <= 99^b, |x + y| and |x - y| are
<= 99^a + 99^b <= 2 * 99^(a+b-1) <= 99^(a+b), |x * y| <= 99^(a+b), and an exact quotient (y != 0) has
|x / y| <= |x| <= 99^a. With K <= 4 leaves every value is within 99^4 = 96,059,601 < 2^31 - 1 (and
products of two values, x * y, are at most 99^4 as well, since they are node values). The verifier makes
this hold for every response, however long or wrong: a literal above 99 (or with a leading zero) is
rejected as soon as its digits show it (it can never equal a number of a valid spec, all <= 99), a literal
is accepted only where it matches a still-unused given number, and a (K + 1)-th operand or a K-th stacked
operator is rejected before anything more is evaluated. So until a response is rejected, only trees over at
most K <= 4 given numbers (<= 99 each) are evaluated; after a rejection the arithmetic may wrap, but the
reward is already 0. The generator's candidates are trees over K numbers <= max_number <= 99.

Diagnostic, measured for `DEFAULT_SPEC` (4 numbers in 1..25, targets 1..100) on the 100,000 problems of
`generate_problems(jax.random.key(0), 100_000, DEFAULT_SPEC)` (no claim about what a model learns from them):

    prompt_length 17; max_response_length 16 (max_solution_length 15, attained by 2.4%, + EOS)
    solution tokens (without EOS)  7: 0.8%  8: 4.2%  9: 10.1%  10: 17.0%  11: 23.2%  12: 22.8%  13: 13.1%
                                   14: 6.4%  15: 2.4%   (mean 11.25)
    parenthesis pairs 0 / 1 / 2: 22% / 60% / 18%; operators + 43%, - 36%, * 14%, / 7%
    targets: quantiles 5% / 25% / 50% / 75% / 95% = 3 / 13 / 27 / 47 / 84 (small targets dominate)
    84,847 distinct problems; a held-out set of 500 (5,000) problems takes 0.18% (1.8%) of the law
    a uniformly random candidate tree (shape, leaf order, operators) over a problem's numbers solves it
    with probability median 1.2% (10% quantile 0.18%; 500 problems, all 7,680 candidates each)

With num_numbers = 3 and the same ranges: prompt 14, response <= 11, mean solution 7.7 tokens, and a random
candidate solves a problem with probability median 4.2%.

Held-out problems. Two problems are the same problem (for held-out purposes) when they have the same
multiset of numbers and the same target, in whatever order the numbers are shown: `problem_hashes` hashes the
sorted numbers and the target, injectively over every valid spec, so excluding held-out problems by hash
excludes exactly them (no false matches).
"""

from __future__ import annotations

import dataclasses
import itertools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from maxrl_jax import metrics as metrics_lib
from maxrl_jax.tasks import base

# ----------------------------------------------------------------------------------------------------------
# Tokens.

PAD = 0
BOS = 1
EOS = 2
DIGIT_0 = 3  # digit d is DIGIT_0 + d, up to DIGIT_9 = 12
DIGIT_9 = DIGIT_0 + 9
PLUS = 13
MINUS = 14
TIMES = 15
DIVIDE = 16
LPAREN = 17
RPAREN = 18
COMMA = 19
EQUALS = 20
ANSWER = 21
VOCAB_SIZE = 32

OPERATOR_TOKENS = (PLUS, MINUS, TIMES, DIVIDE)  # operator code o in 0..3 is the token PLUS + o
TOKEN_TEXT = {
    PAD: "_", BOS: "<bos>", EOS: "<eos>", PLUS: "+", MINUS: "-", TIMES: "*", DIVIDE: "/", LPAREN: "(",
    RPAREN: ")", COMMA: ",", EQUALS: "=", ANSWER: ":", **{DIGIT_0 + d: str(d) for d in range(10)},
}

# The largest number a spec may use; the verifier rejects every literal above it.
MAX_NUMBER_LIMIT = 99
# The largest target a spec may use (keeps `problem_hashes` injective, see there).
MAX_TARGET_LIMIT = 1000


# ----------------------------------------------------------------------------------------------------------
# Parameters and sizes.


@dataclasses.dataclass(frozen=True)
class CountdownSpec:
    """The task's parameters (hashable: pass it as a static argument).

    num_numbers: K, how many numbers a problem gives (3 or 4).
    max_number: the numbers are drawn uniformly from 1..max_number (1..99).
    max_target: targets are in 1..max_target (max_number..1000).
    """

    num_numbers: int = 4
    max_number: int = 25
    max_target: int = 100

    def __post_init__(self):
        check_spec(self)


def _check_int_field(name: str, value, low: int, high: int, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"CountdownSpec.{name} must be a Python int in {allowed}, got {value!r} of type "
                         f"{type(value).__name__}.")
    if not low <= value <= high:
        raise ValueError(f"CountdownSpec.{name} must be in {allowed}, got {value}.")


def check_spec(spec: CountdownSpec) -> CountdownSpec:
    """Returns `spec` if its fields are in range; raises a ValueError naming the field and its range otherwise.

    num_numbers in {3, 4} (more would break the int32 bound 99^K < 2^31, see the module docstring);
    max_number in [1, 99] (MAX_NUMBER_LIMIT); max_target in [max_number, 1000] (MAX_TARGET_LIMIT; at least
    max_number so that random trees land in the target range often enough: the acceptance rate of
    `generate_problem` is then >= 5% for every valid spec, see there).
    """
    if not isinstance(spec, CountdownSpec):
        raise ValueError(f"spec must be a CountdownSpec, got {spec!r} of type {type(spec).__name__}.")
    _check_int_field("num_numbers", spec.num_numbers, 3, 4, "{3, 4}")
    _check_int_field("max_number", spec.max_number, 1, MAX_NUMBER_LIMIT, f"[1, {MAX_NUMBER_LIMIT}]")
    _check_int_field("max_target", spec.max_target, spec.max_number, MAX_TARGET_LIMIT,
                     f"[max_number, {MAX_TARGET_LIMIT}] = [{spec.max_number}, {MAX_TARGET_LIMIT}]")
    return spec


DEFAULT_SPEC = CountdownSpec()


def number_width(spec: CountdownSpec) -> int:
    """W: decimal digits of max_number, the prompt slots of every number (2 for the default spec)."""
    return len(str(check_spec(spec).max_number))


def target_width(spec: CountdownSpec) -> int:
    """Wt: decimal digits of max_target, the prompt slots of the target (3 for the default spec)."""
    return len(str(check_spec(spec).max_target))


def prompt_length(spec: CountdownSpec) -> int:
    """Prompt tokens: BOS + K numbers of W slots + (K - 1) commas + EQUALS + Wt target slots + ANSWER."""
    k = check_spec(spec).num_numbers
    return 1 + k * number_width(spec) + (k - 1) + 1 + target_width(spec) + 1


def max_solution_length(spec: CountdownSpec) -> int:
    """Upper bound on the tokens of a canonical solution: K W digits + (K - 1) operators + 2 (K - 2) parens."""
    k = check_spec(spec).num_numbers
    return k * number_width(spec) + (k - 1) + 2 * (k - 2)


def max_response_length(spec: CountdownSpec) -> int:
    """Response length that fits every canonical solution and its EOS: max_solution_length(spec) + 1."""
    return max_solution_length(spec) + 1


# ----------------------------------------------------------------------------------------------------------
# Problems.


@flax.struct.dataclass
class Problems:
    """A batch of problems (a pytree; the task batch of `encode_prompts` and `verify_groups`).

    numbers: int32 [n, K], the given numbers in prompt order.
    target: int32 [n].
    solution: int32 [n, max_solution_length(spec)], a canonical solution's tokens, then PAD (no EOS); None for
      problems built by hand (`encode_prompts` and the verifier read only numbers and target).
    solution_length: int32 [n], tokens of each solution; None with `solution`.
    """

    numbers: jax.Array
    target: jax.Array
    solution: jax.Array | None = None
    solution_length: jax.Array | None = None


def _check_problems(problems: Problems, name: str = "problems") -> int:
    """Checks a batch of problems' shapes (numbers [n, K], target [n]); returns K."""
    if not isinstance(problems, Problems):
        raise ValueError(f"{name} must be a countdown.Problems, got {type(problems).__name__}.")
    numbers, target = problems.numbers, problems.target
    if numbers.ndim != 2 or target.shape != numbers.shape[:1]:
        raise ValueError(f"{name}.numbers must be [n, K] and {name}.target [n], got {numbers.shape} and "
                         f"{target.shape}.")
    if not 1 <= numbers.shape[1] <= 4:
        raise ValueError(f"{name}.numbers must have 1 to 4 numbers per problem (the int32 bound 99^K), got "
                         f"shape {numbers.shape}.")
    for field, array in (("numbers", numbers), ("target", target)):
        if not np.issubdtype(np.dtype(array.dtype), np.integer):
            raise ValueError(f"{name}.{field} must be integers, got dtype {array.dtype}.")
    return numbers.shape[1]


def _check_count(n, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive Python int, got {n!r}.")
    return int(n)


def _check_spec_matches(problems: Problems, spec: CountdownSpec) -> None:
    if problems.numbers.shape[-1] != spec.num_numbers:
        raise ValueError(f"problems have {problems.numbers.shape[-1]} numbers each but spec.num_numbers is "
                         f"{spec.num_numbers}.")


# ----------------------------------------------------------------------------------------------------------
# Generation: random expression trees.

# Attempts at one problem before the fallback (`generate_problems`).
MAX_ATTEMPTS = 1024


def _tree_shapes(first: int, last: int) -> list:
    """All binary trees over the leaves first..last in order: a leaf is its index, a node a (left, right) pair."""
    if first == last:
        return [first]
    return [(left, right) for split in range(first, last)
            for left in _tree_shapes(first, split) for right in _tree_shapes(split + 1, last)]


def tree_shapes(num_leaves: int) -> list:
    """The Catalan(K - 1) tree shapes over K leaves (2 for K = 3, 5 for K = 4), in a fixed order."""
    return _tree_shapes(0, num_leaves - 1)


def _precedence(op: jax.Array) -> jax.Array:
    """1 for + and - (codes 0, 1), 2 for * and / (codes 2, 3)."""
    return jnp.where(op >= 2, 2, 1).astype(jnp.int32)


def _apply(op: jax.Array, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x op y in int32 for op codes 0..3 (+ - * /): (value, valid); a division is valid iff y != 0 and y | x.

    The value of an invalid division is 0. The caller guarantees that no valid value overflows (see the
    module docstring); an invalid result is discarded.
    """
    # Truncating integer division (lax.rem / lax.div): y divides x iff the remainder is 0, whatever the
    # signs, and then the truncated quotient is the exact one.
    safe_y = jnp.where(y == 0, 1, y)
    exact = (y != 0) & (jax.lax.rem(x, safe_y) == 0)
    quotient = jnp.where(exact, jax.lax.div(x, safe_y), 0)
    value = jnp.where(op == 0, x + y, jnp.where(op == 1, x - y, jnp.where(op == 2, x * y, quotient)))
    return value.astype(jnp.int32), (op != 3) | exact


def _digit(value: jax.Array, power: int) -> jax.Array:
    """The decimal digit of the non-negative int32 `value` at `power` (a power of 10)."""
    return jax.lax.rem(jax.lax.div(value, jnp.int32(power)), jnp.int32(10))


def _number_pieces(value: jax.Array, width: int) -> tuple[list, list]:
    """The digit tokens of a positive int32 `value` < 10^width in `width` slots, with keep flags (no leading zeros)."""
    tokens, keep = [], []
    for position in range(width):
        power = 10 ** (width - 1 - position)
        tokens.append(DIGIT_0 + _digit(value, power))
        keep.append((value >= power) | (position == width - 1))
    return tokens, keep


def _shape_candidate(shape, leaves: jax.Array, ops: jax.Array, width: int, memo: dict):
    """Evaluates and writes one static tree shape: (value, valid, tokens [C], keep [C]).

    Operators are numbered in postfix order; `tokens` holds every token the shape could write (all digit
    slots, every operator, a parenthesis pair around every non-root operator node) and `keep` says which of
    them the canonical form writes. `memo` (one dict for all shapes of a tree) shares the leaves' digits and
    the subtrees that several shapes have in common, so each is built once.
    """
    op_counter = itertools.count()

    def visit(node):
        # Returns value, valid, precedence (3 for a leaf), tokens, keep, whether the node is a leaf (static).
        if isinstance(node, int):
            if node not in memo:
                tokens, keep = _number_pieces(leaves[node], width)
                memo[node] = leaves[node], jnp.bool_(True), jnp.int32(3), tokens, keep, True
            return memo[node]
        left, right = visit(node[0]), visit(node[1])
        op_position = next(op_counter)
        if (node, op_position) in memo:
            return memo[node, op_position]
        op = ops[op_position]
        prec = _precedence(op)
        value, valid = _apply(op, left[0], right[0])
        tokens, keep = [], []
        for child, paren in ((left, left[2] < prec), (right, right[2] <= prec)):
            if child[5]:
                tokens += child[3]
                keep += child[4]
            else:  # an operator node: it may need a pair of parentheses
                tokens += [jnp.int32(LPAREN), *child[3], jnp.int32(RPAREN)]
                keep += [paren, *child[4], paren]
            if child is left:
                tokens.append(PLUS + op)
                keep.append(jnp.bool_(True))
        memo[node, op_position] = value, valid & left[1] & right[1], prec, tokens, keep, False
        return memo[node, op_position]

    value, valid, _, tokens, keep, _ = visit(shape)
    return value, valid, jnp.stack([jnp.asarray(t, jnp.int32) for t in tokens]), jnp.stack(
        [jnp.asarray(k, jnp.bool_) for k in keep])


def _candidate(key: jax.Array, spec: CountdownSpec):
    """One random candidate tree: (numbers [K], leaves [K], shape index, operator codes [K - 1]), all int32.

    numbers: i.i.d. uniform in 1..max_number, in prompt order. The tree: a uniform shape among
    `tree_shapes(K)`, the numbers assigned to its leaves in a uniformly random order (leaves = numbers[perm],
    perm uniform among the K! permutations), i.i.d. uniform operators (postfix order). All choices come from
    one `jax.random.bits` draw of 2 K + 1 uint32 words, each reduced modulo its range (a modulo bias below
    99 / 2^32 < 3e-8).
    """
    k = spec.num_numbers
    bits = jax.random.bits(key, (2 * k + 1,), jnp.uint32)
    numbers = (bits[:k] % jnp.uint32(spec.max_number)).astype(jnp.int32) + 1
    shape_index = (bits[k] % jnp.uint32(len(tree_shapes(k)))).astype(jnp.int32)
    permutations = jnp.asarray(list(itertools.permutations(range(k))), jnp.int32)  # [K!, K]
    perm = permutations[(bits[k + 1] % jnp.uint32(len(permutations))).astype(jnp.int32)]
    leaves = numbers[perm]
    ops = (bits[k + 2:] % jnp.uint32(4)).astype(jnp.int32)
    return numbers, leaves, shape_index, ops


def _evaluate(leaves, shape_index, ops, spec: CountdownSpec):
    """(value, valid) of the tree `tree_shapes(K)[shape_index]` over `leaves` with operators `ops`."""
    memo = {}
    results = [_shape_candidate(shape, leaves, ops, number_width(spec), memo)[:2]
               for shape in tree_shapes(spec.num_numbers)]
    values, valids = (jnp.stack(xs) for xs in zip(*results))
    return values[shape_index], valids[shape_index]


def _write(leaves, shape_index, ops, spec: CountdownSpec):
    """(solution int32 [S], length) of the tree: its canonical tokens compacted to the front, then PAD."""
    size = max_solution_length(spec)
    memo = {}
    results = [_shape_candidate(shape, leaves, ops, number_width(spec), memo)[2:]
               for shape in tree_shapes(spec.num_numbers)]
    tokens, keep = (jnp.stack(xs)[shape_index] for xs in zip(*results))  # [C] each, C = size
    position = jnp.where(keep, jnp.cumsum(keep) - 1, size)
    solution = jnp.full((size,), PAD, jnp.int32).at[position].set(tokens, mode="drop")
    return solution, jnp.sum(keep, dtype=jnp.int32)


def generate_problem(key: jax.Array, spec: CountdownSpec) -> Problems:
    """One solvable problem with a canonical solution (fields without the batch axis; jittable, spec static).

    Attempt a = 0, 1, ... draws a candidate from `fold_in(key, a)` (see `_candidate`: numbers i.i.d. uniform
    in 1..max_number, a uniform tree shape, a random leaf order, i.i.d. uniform operators), evaluates the tree
    exactly in int32 (no overflow: module docstring) and accepts it iff every division is exact and the value
    is in [1, max_target]; the target is that value. This is a bounded `lax.while_loop` of at most
    MAX_ATTEMPTS = 1024 attempts, and the output law is the candidate law conditioned on acceptance.

    Acceptance rate p (measured with 10^5 candidates): 0.165 for the default spec; it grows with max_target,
    and over every valid spec (max_target >= max_number) it is smallest at max_target = max_number = 99:
    0.055 for K = 4, 0.12 for K = 3. All MAX_ATTEMPTS candidates fail with probability (1 - p)^1024: below
    1e-80 for the default spec and below 1e-24 for every valid spec. Only then the problem is the fallback:
    numbers (x, 1, ..., 1) with x = min(first number of the last candidate, max_target), solution
    "x*1*...*1", target x, still a valid problem whose solution verifies.
    """
    check_spec(spec)
    k = spec.num_numbers

    def cond(state):
        attempts, ok = state[0], state[-1]
        return ~ok & (attempts < MAX_ATTEMPTS)

    def body(state):
        attempts = state[0]
        numbers, leaves, shape_index, ops = _candidate(jax.random.fold_in(key, attempts), spec)
        value, valid = _evaluate(leaves, shape_index, ops, spec)
        ok = valid & (value >= 1) & (value <= spec.max_target)
        return attempts + 1, numbers, leaves, shape_index, ops, value, ok

    zeros = jnp.zeros((k,), jnp.int32)
    init = (jnp.uint32(0), zeros, zeros, jnp.int32(0), jnp.zeros((k - 1,), jnp.int32), jnp.int32(0), jnp.bool_(False))
    _, numbers, leaves, shape_index, ops, value, ok = jax.lax.while_loop(cond, body, init)
    # Fallback (all attempts failed): numbers and leaves (x, 1, ..., 1) with x = min(numbers[0], max_target),
    # the left chain x*1*...*1 = x.
    first = jnp.minimum(numbers[0], spec.max_target)
    fallback = jnp.ones((k,), jnp.int32).at[0].set(first)
    numbers = jnp.where(ok, numbers, fallback)
    leaves = jnp.where(ok, leaves, fallback)
    shape_index = jnp.where(ok, shape_index, _left_chain_index(k))
    ops = jnp.where(ok, ops, 2)
    value = jnp.where(ok, value, first)
    solution, length = _write(leaves, shape_index, ops, spec)
    return Problems(numbers=numbers, target=value, solution=solution, solution_length=length)


def _left_chain_index(num_leaves: int) -> int:
    """The index in `tree_shapes` of the left chain ((a o b) o c) o d."""
    chain = 0
    for leaf in range(1, num_leaves):
        chain = (chain, leaf)
    return tree_shapes(num_leaves).index(chain)


def generate_problems_from_keys(keys: jax.Array, spec: CountdownSpec) -> Problems:
    """`generate_problem` vmapped over keys [n]: Problems with numbers [n, K] etc. Problem i depends only on keys[i]."""
    return jax.vmap(lambda key: generate_problem(key, spec))(keys)


def _problem_keys(rng: jax.Array, n: int) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n, dtype=jnp.uint32))


def _draw_keys(problem_keys: jax.Array, draw) -> jax.Array:
    """The key of draw `draw` (0 = first, then the held-out redraws) of each problem."""
    return jax.vmap(lambda key: jax.random.fold_in(key, draw))(problem_keys)


def generate_problems(rng: jax.Array, n: int, spec: CountdownSpec) -> Problems:
    """`n` independent solvable problems with canonical solutions (jittable; `n` and `spec` static).

    Problem i is `generate_problem(fold_in(fold_in(rng, i), 0), spec)`, so the first m problems do not depend
    on `n` (the inner 0 is the draw index of `draw_training_problems`). Returns Problems with numbers int32
    [n, K] (prompt order), target int32 [n] in [1, max_target], solution int32 [n, max_solution_length(spec)]
    and solution_length int32 [n]; every solution, followed by EOS, scores 1 under `verify`.
    """
    n = _check_count(n)
    return generate_problems_from_keys(_draw_keys(_problem_keys(rng, n), 0), check_spec(spec))


# ----------------------------------------------------------------------------------------------------------
# Tokenisation and SFT batches.


def _write_number(values: jax.Array, width: int) -> jax.Array:
    """int [...] values in [0, 10^width) -> int32 [..., width]: right-aligned digit tokens, PAD on the left."""
    values = values.astype(jnp.int32)
    slots = []
    for position in range(width):
        power = 10 ** (width - 1 - position)
        significant = (values >= power) | (position == width - 1)
        slots.append(jnp.where(significant, DIGIT_0 + _digit(values, power), PAD))
    return jnp.stack(slots, axis=-1).astype(jnp.int32)


def encode_prompts(problems: Problems, spec: CountdownSpec) -> jax.Array:
    """Prompt tokens int32 [n, prompt_length(spec)] (layout in the module docstring; jittable, spec static).

    Numbers and targets must be in the spec's ranges (numbers in 1..max_number, targets in 1..max_target);
    values with more digits than their slots would be cut to their last digits.
    """
    _check_problems(problems)
    check_spec(spec)
    _check_spec_matches(problems, spec)
    n, k = problems.numbers.shape
    numbers = _write_number(problems.numbers, number_width(spec))  # [n, K, W]
    commas = jnp.full((n, k, 1), COMMA, jnp.int32).at[:, -1, 0].set(EQUALS)  # the last number is followed by '='
    body = jnp.concatenate([numbers, commas], axis=2).reshape(n, -1)
    target = _write_number(problems.target, target_width(spec))  # [n, Wt]
    return jnp.concatenate([jnp.full((n, 1), BOS, jnp.int32), body, target,
                            jnp.full((n, 1), ANSWER, jnp.int32)], axis=1)


def _read_number(tokens: jax.Array) -> jax.Array:
    """Digit slots int [..., W] -> int32 [...]: PAD (and any non-digit) reads as a leading blank."""
    digits = jnp.where((tokens >= DIGIT_0) & (tokens <= DIGIT_9), tokens - DIGIT_0, 0).astype(jnp.int32)
    powers = 10 ** jnp.arange(tokens.shape[-1] - 1, -1, -1, dtype=jnp.int32)
    return jnp.sum(digits * powers, axis=-1, dtype=jnp.int32)


def decode_prompts(prompts: jax.Array, spec: CountdownSpec) -> Problems:
    """Inverse of `encode_prompts`: prompts int [n, prompt_length(spec)] -> Problems (numbers, target only).

    Only the digit slots are read; the frame tokens (BOS, commas, '=', ANSWER) are not checked here.
    """
    check_spec(spec)
    length = prompt_length(spec)
    if prompts.ndim != 2 or prompts.shape[1] != length:
        raise ValueError(f"prompts must have shape [n, {length}] for {spec}, got {prompts.shape}.")
    n, k, width = prompts.shape[0], spec.num_numbers, number_width(spec)
    body = prompts[:, 1:1 + k * (width + 1)].reshape(n, k, width + 1)[:, :, :width]
    target = prompts[:, 1 + k * (width + 1):-1]
    return Problems(numbers=_read_number(body), target=_read_number(target))


def encode_targets(problems: Problems, spec: CountdownSpec) -> tuple[jax.Array, jax.Array]:
    """Response targets: (tokens int32 [n, R], loss_mask bool [n, R]) with R = max_response_length(spec).

    tokens: the solution, EOS, then PAD; loss_mask: True on the solution tokens and the EOS.
    """
    if problems.solution is None or problems.solution_length is None:
        raise ValueError("problems carry no solution (solution / solution_length are None); "
                         "use problems from generate_problems or draw_training_problems.")
    width = max_response_length(spec)
    if problems.solution.ndim != 2 or problems.solution.shape[1] > width - 1:
        raise ValueError(f"problems.solution must be [n, S] with S <= {width - 1}, got {problems.solution.shape}.")
    positions = jnp.arange(width, dtype=jnp.int32)[None, :]
    lengths = problems.solution_length.astype(jnp.int32)[:, None]
    padded = jnp.pad(problems.solution.astype(jnp.int32), ((0, 0), (0, width - problems.solution.shape[1])))
    tokens = jnp.where(positions < lengths, padded, PAD)
    tokens = jnp.where(positions == lengths, EOS, tokens)
    return tokens.astype(jnp.int32), positions <= lengths


def sft_batch(rng: jax.Array, batch_size: int, spec: CountdownSpec,
              heldout_table: jax.Array | None = None) -> dict:
    """A supervised batch of fresh problems with their canonical solutions (jittable; batch_size, spec static).

    Args:
      rng: PRNG key (consumed).
      batch_size: B.
      spec: the task's parameters.
      heldout_table: optional sorted uint32 hash table of held-out problems (`hash_table`) never to train on;
        the problems come from `draw_training_problems` (equal to `generate_problems` when none is held out).

    Returns a dict:
      inputs: int32 [B, Lp + R] (Lp = prompt_length(spec), R = max_response_length(spec)): the prompt, the
        solution, EOS, then PAD.
      loss_mask: bool [B, Lp + R], True exactly on the solution tokens and the EOS.
      problems: the Problems drawn (numbers [B, K], target [B], solution, solution_length).
      redraws: int32 [], held-out draws replaced (`draw_training_problems`; 0 without a table).

    Alignment: `inputs[:, t]` is predicted from the logits at position t - 1, so a trainer uses
    `logits = model(inputs[:, :-1])`, `targets = inputs[:, 1:]` and `weights = loss_mask[:, 1:]`.
    """
    problems, redraws = draw_training_problems(rng, batch_size, spec, heldout_table)
    prompts = encode_prompts(problems, spec)
    targets, target_mask = encode_targets(problems, spec)
    return {
        "inputs": jnp.concatenate([prompts, targets], axis=1),
        "loss_mask": jnp.concatenate([jnp.zeros(prompts.shape, jnp.bool_), target_mask], axis=1),
        "problems": problems,
        "redraws": redraws,
    }


# ----------------------------------------------------------------------------------------------------------
# Verifier.


def _check_token_ids(responses, name: str = "responses") -> None:
    """Integer dtype always (also under jit); values that fit int32 when concrete (see maze._check_token_ids)."""
    dtype = np.dtype(responses.dtype)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {dtype}.")
    if isinstance(responses, jax.core.Tracer):
        return
    values = np.asarray(responses)
    if values.size:
        info = np.iinfo(np.int32)
        outside = values[(values < info.min) | (values > info.max)]
        if outside.size:
            raise ValueError(f"{name} holds token ids outside the int32 range (e.g. {int(outside[0])}), which JAX "
                             f"would wrap to other ids; token ids are in [0, {VOCAB_SIZE}).")


def verify(problem: Problems, response: jax.Array) -> jax.Array:
    """Reward of one response on one problem: float32 scalar, 1.0 or 0.0 (jittable).

    Args:
      problem: one problem, Problems with numbers int [K] (K <= 4; in 1..99 for any valid spec) and target an
        int scalar (solution fields are ignored). A given number above MAX_NUMBER_LIMIT (outside every valid
        spec) can never be matched, since such literals are rejected: a response needing it scores 0.
      response: int [M], the sampled tokens after the prompt (any M >= 1). Ids are compared in their own
        integer dtype (see maze.verify on ids beyond int32), so an id outside the vocabulary is junk.

    Reward 1 iff the tokens before the first EOS form a valid expression (module docstring) over exactly the
    given numbers that evaluates to the target; 0 if there is no EOS within M tokens or anything is wrong.
    Tokens after the first EOS are ignored.

    Algorithm: one `lax.scan` over the M tokens, a shunting-yard parser that evaluates as it reduces, with
    static-size stacks: values int32 [K], operators [K - 1] each tagged with the parenthesis depth at which it
    was pushed (a '(' only raises the depth, so parentheses need no stack slots and may nest arbitrarily deep).
    An operator pops and applies the operators of the same depth whose precedence is >= its own, then is
    pushed; ')' applies the operators of its depth and lowers the depth; EOS applies the rest. A literal is
    matched against an unused given number when it ends (greedy matching decides multiset equality exactly);
    a literal above MAX_NUMBER_LIMIT, a literal with a leading zero, the (K + 1)-th operand or the K-th
    operator reject the response at once (none can be part of a valid answer), which also bounds every
    evaluated value (module docstring: no int32 overflow).
    """
    if not isinstance(problem, Problems):
        raise ValueError(f"problem must be a countdown.Problems, got {type(problem).__name__}.")
    numbers, target = problem.numbers, problem.target
    if numbers.ndim != 1 or not 1 <= numbers.shape[0] <= 4 or np.shape(target) != ():
        raise ValueError(f"numbers must be [K] with 1 <= K <= 4 and target a scalar, got {numbers.shape} and "
                         f"{np.shape(target)}; use verify_batch / verify_groups for batches.")
    if response.ndim != 1:
        raise ValueError(f"response must have shape [M], got {response.shape}; use verify_batch/verify_groups.")
    _check_token_ids(response, "response")
    numbers = jnp.asarray(numbers).astype(jnp.int32)
    target = jnp.asarray(target).astype(jnp.int32)
    response = jnp.asarray(response)
    k = numbers.shape[0]
    op_slots = max(k - 1, 1)

    val_index = jnp.arange(k)
    op_index = jnp.arange(op_slots)
    get = lambda array, index, i: jnp.sum(jnp.where(index == i, array, 0))  # one-hot reads and writes
    put = lambda array, index, i, value, enabled: jnp.where(enabled & (index == i), value, array)

    def reduce_once(s, threshold, enabled):
        """Applies the top operator if it has the current depth and precedence >= threshold."""
        top = s["num_ops"] - 1
        op = get(s["ops"], op_index, top)
        fire = (enabled & (s["num_ops"] > 0) & (get(s["op_depth"], op_index, top) == s["depth"])
                & (_precedence(op) >= threshold) & (s["num_vals"] >= 2))
        i = s["num_vals"] - 2
        value, valid = _apply(op, get(s["vals"], val_index, i), get(s["vals"], val_index, i + 1))
        s = dict(s)
        s["vals"] = put(s["vals"], val_index, i, value, fire)
        s["num_vals"] = s["num_vals"] - fire.astype(jnp.int32)
        s["num_ops"] = s["num_ops"] - fire.astype(jnp.int32)
        s["bad"] = s["bad"] | (fire & ~valid)
        return s

    def step(s, token):
        active = ~s["done"]
        is_digit = (token >= DIGIT_0) & (token <= DIGIT_9)
        is_op = (token >= PLUS) & (token <= DIVIDE)
        is_lparen, is_rparen, is_eos = token == LPAREN, token == RPAREN, token == EOS
        digit = jnp.where(is_digit, token - DIGIT_0, 0).astype(jnp.int32)
        op = jnp.where(is_op, token - PLUS, 0).astype(jnp.int32)
        expect_operand, bad = s["expect_operand"], s["bad"]
        new = dict(s)

        # 1. A literal ends at any non-digit: match it against an unused given number and push it.
        ending = s["in_number"] & ~is_digit
        match = (numbers == s["literal"]) & ~s["used"]
        found = jnp.any(match)
        bad = bad | (ending & ~found)
        new["used"] = s["used"] | (ending & found & (val_index == jnp.argmax(match)))
        new["vals"] = put(s["vals"], val_index, s["num_vals"], s["literal"], ending)
        new["num_vals"] = s["num_vals"] + ending.astype(jnp.int32)

        # 2. A digit starts a literal where an operand is expected, else continues the current one; a
        #    digit right after ')' is an error. Leading zeros and literals above MAX_NUMBER_LIMIT are errors.
        starting = is_digit & expect_operand
        continuing = is_digit & ~expect_operand & s["in_number"]
        longer = s["literal"] * 10 + digit
        new["num_literals"] = s["num_literals"] + starting.astype(jnp.int32)
        new["literal"] = jnp.where(starting, digit, jnp.where(continuing, jnp.minimum(longer, 1000), s["literal"]))
        new["leading_zero"] = jnp.where(starting, digit == 0, s["leading_zero"])
        new["in_number"] = starting | continuing
        bad = bad | (starting & (new["num_literals"] > k)) | (is_digit & ~expect_operand & ~s["in_number"])
        bad = bad | (continuing & (s["leading_zero"] | (longer > MAX_NUMBER_LIMIT)))

        # 3. An operator, ')' or EOS applies the stacked operators of the current depth that bind at least as
        #    tightly as the operator (all of them for ')' and EOS).
        bad = bad | ((is_op | is_rparen | is_eos) & expect_operand)
        new["bad"] = bad
        new = reduce_all(new, jnp.where(is_op, _precedence(op), 0), is_op | is_rparen | is_eos)
        bad = new["bad"]

        # 4. An operator is then pushed (the K-th stacked operator means more than K operands: an error).
        bad = bad | (is_op & (new["num_ops"] >= k - 1))
        new["ops"] = put(new["ops"], op_index, new["num_ops"], op, is_op)
        new["op_depth"] = put(new["op_depth"], op_index, new["num_ops"], s["depth"], is_op)
        new["num_ops"] = new["num_ops"] + is_op.astype(jnp.int32)

        # 5. Parentheses: '(' only where an operand is expected, ')' only inside a group.
        bad = bad | (is_lparen & ~expect_operand) | (is_rparen & (s["depth"] == 0)) | (is_eos & (s["depth"] != 0))
        new["depth"] = s["depth"] + is_lparen.astype(jnp.int32) - is_rparen.astype(jnp.int32)

        # 6. Anything else before EOS (PAD, BOS, prompt tokens, reserved or out-of-vocabulary ids) is junk.
        bad = bad | ~(is_digit | is_op | is_lparen | is_rparen | is_eos)
        new["bad"] = bad
        new["expect_operand"] = jnp.where(is_digit | is_rparen, False,
                                          jnp.where(is_op | is_lparen, True, expect_operand))

        # 7. EOS: the expression is complete; it scores iff all is well and its value is the target.
        correct = ~bad & jnp.all(new["used"]) & (new["num_vals"] == 1) & (new["vals"][0] == target)
        new["reward"] = jnp.where(is_eos, correct.astype(jnp.float32), s["reward"])
        new["done"] = is_eos
        return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, s), None

    def reduce_all(s, threshold, enabled):
        for _ in range(op_slots):  # at most K - 1 operators are ever stacked
            s = reduce_once(s, threshold, enabled)
        return s

    false = jnp.bool_(False)
    zero = jnp.int32(0)
    init = dict(
        done=false, bad=false, reward=jnp.float32(0), expect_operand=jnp.bool_(True), in_number=false,
        literal=zero, leading_zero=false, num_literals=zero, used=jnp.zeros((k,), jnp.bool_),
        vals=jnp.zeros((k,), jnp.int32), num_vals=zero, ops=jnp.zeros((op_slots,), jnp.int32),
        op_depth=jnp.zeros((op_slots,), jnp.int32), num_ops=zero, depth=zero,
    )
    final, _ = jax.lax.scan(step, init, response)
    return final["reward"]


def verify_batch(problems: Problems, responses: jax.Array) -> jax.Array:
    """`verify` over a batch: problems [B] (numbers [B, K], target [B]), responses int [B, M] -> float32 [B]."""
    _check_problems(problems)
    if responses.ndim != 2 or responses.shape[0] != problems.numbers.shape[0]:
        raise ValueError(f"responses must be [B, M] with B = {problems.numbers.shape[0]}, got {responses.shape}.")
    _check_token_ids(responses)
    return jax.vmap(verify)(Problems(numbers=problems.numbers, target=problems.target), responses)


def verify_groups(problems: Problems, responses: jax.Array) -> jax.Array:
    """`verify` over groups: problems [P] (numbers [P, K], target [P]), responses int [P, N, M] -> float32 [P, N].

    The task batch is the same Problems pytree that `encode_prompts` turns into the prompts (only its numbers
    and target are read), so a trainer passes `functools.partial(encode_prompts, spec=spec)` as its prompt
    function and this as its verifier.
    """
    _check_problems(problems)
    if responses.ndim != 3 or responses.shape[0] != problems.numbers.shape[0]:
        raise ValueError(f"responses must be [P, N, M] with P = {problems.numbers.shape[0]}, got {responses.shape}.")
    _check_token_ids(responses)
    tasks = Problems(numbers=problems.numbers, target=problems.target)
    return jax.vmap(lambda problem, group: jax.vmap(lambda r: verify(problem, r))(group))(tasks, responses)


# ----------------------------------------------------------------------------------------------------------
# Held-out problems: identities and exclusion from training draws.

# Redraws of one training problem that landed in the held-out set, before giving up (`draw_training_problems`).
MAX_REDRAWS = 32


def _binomial(y: jax.Array, r: int) -> jax.Array:
    """C(y, r) for int32 y >= 0 and static r <= 4 (exact: the running product is divisible at every step)."""
    result = jnp.ones_like(y)
    for j in range(r):
        result = result * (y - j) // (j + 1)
    return jnp.where(y >= r, result, 0)


def problem_hashes(problems: Problems) -> jax.Array:
    """uint32 [n]: a problem's identity, its sorted numbers and its target (jittable).

    Problems with the same multiset of numbers and the same target hash equally in any number order. On every
    valid spec's range (K <= 4 numbers in 1..99, target in 0..1000) the hash is injective: the sorted numbers
    x_0 <= ... <= x_{K-1} (x = number - 1, in 0..98) are ranked in the combinatorial number system,
    rank = sum_{i=0}^{K-1} C(x_i + i, i + 1) (x_i + i is strictly increasing, so this is a bijection from the
    multisets onto [0, C(98 + K, K)); C(102, 4) = 4,249,575), and the hash is rank * 1001 + target
    <= 4,249,574 * 1001 + 1000 < 2^32. Out-of-range values still hash deterministically.
    """
    _check_problems(problems)
    x = jnp.sort(problems.numbers.astype(jnp.int32), axis=-1) - 1
    rank = jnp.zeros(x.shape[:-1], jnp.uint32)
    for i in range(x.shape[-1]):
        rank = rank + _binomial(x[..., i] + i, i + 1).astype(jnp.uint32)
    return rank * jnp.uint32(MAX_TARGET_LIMIT + 1) + problems.target.astype(jnp.uint32)


def hash_table(problems: Problems) -> np.ndarray:
    """Sorted unique uint32 hashes of a set of problems: the table `draw_training_problems` excludes."""
    return np.unique(np.asarray(_problem_hashes(jax.tree.map(jnp.asarray, problems))))


def in_table(hashes: jax.Array, table: jax.Array) -> jax.Array:
    """bool, same shape as `hashes`: whether each hash is in the sorted uint32 `table` [T] (T may be 0)."""
    if table.shape[0] == 0:
        return jnp.zeros(hashes.shape, jnp.bool_)
    index = jnp.clip(jnp.searchsorted(table, hashes), 0, table.shape[0] - 1)
    return table[index] == hashes


def count_in_table(problems: Problems, table: jax.Array) -> jax.Array:
    """int32: how many of the problems are in the sorted hash table (0 for a clean training draw)."""
    return jnp.sum(in_table(problem_hashes(problems), table), dtype=jnp.int32)


def draw_training_problems(rng: jax.Array, n: int, spec: CountdownSpec, excluded_table: jax.Array | None = None
                           ) -> tuple[Problems, jax.Array]:
    """Fresh training problems that are never held-out problems: (Problems [n], int32 redraws []).

    Problem i is first drawn exactly as `generate_problems(rng, n, spec)` draws it (draw 0 of the key
    `fold_in(rng, i)`); while it is in `excluded_table` (sorted uint32, `hash_table`), draw r = 1, 2, ...
    replaces it, from `fold_in(fold_in(rng, i), r)`, at most MAX_REDRAWS times (a bounded `lax.while_loop`).
    Since `problem_hashes` is injective, a problem is redrawn exactly when it is held out, so the result is the
    generator's law conditioned on not being held out, and equal to `generate_problems` whenever no draw
    hits the table. `redraws` counts the redraws made. If a problem is still held out after MAX_REDRAWS
    redraws (probability share^MAX_REDRAWS, share = `heldout_mass`; below 1e-30 for share <= 0.1), it is
    returned as drawn; `count_in_table` on the output detects it.

    Jittable with `n` and `spec` static.
    """
    n = _check_count(n)
    check_spec(spec)
    problem_keys = _problem_keys(rng, n)
    if excluded_table is None or excluded_table.shape[0] == 0:
        return generate_problems_from_keys(_draw_keys(problem_keys, 0), spec), jnp.zeros((), jnp.int32)
    excluded_table = jnp.asarray(excluded_table, jnp.uint32)

    def held_out(p):
        return in_table(problem_hashes(p), excluded_table)

    def cond(state):
        _, hit, draw, _ = state
        return jnp.any(hit) & (draw <= MAX_REDRAWS)

    def body(state):
        # Draw `draw` of every problem still to be (re)drawn; draw 0 is the first draw of all of them.
        problems, hit, draw, redraws = state
        fresh = generate_problems_from_keys(_draw_keys(problem_keys, draw), spec)
        problems = jax.tree.map(lambda new, old: jnp.where(hit.reshape((-1,) + (1,) * (old.ndim - 1)), new, old),
                                fresh, problems)
        redraws = redraws + jnp.where(draw > 0, jnp.sum(hit, dtype=jnp.int32), 0)
        return problems, hit & held_out(fresh), draw + 1, redraws

    empty = Problems(numbers=jnp.zeros((n, spec.num_numbers), jnp.int32), target=jnp.zeros((n,), jnp.int32),
                     solution=jnp.zeros((n, max_solution_length(spec)), jnp.int32),
                     solution_length=jnp.zeros((n,), jnp.int32))
    problems, _, _, redraws = jax.lax.while_loop(
        cond, body, (empty, jnp.ones((n,), jnp.bool_), jnp.uint32(0), jnp.zeros((), jnp.int32)))
    return problems, redraws


def heldout_key(spec: CountdownSpec, seed: int = 0) -> jax.Array:
    """The fixed key of the held-out set: `key(seed)` folded with the spec's fields (independent of any run)."""
    check_spec(spec)
    key = jax.random.key(seed)
    for value in (0xC0DE, spec.num_numbers, spec.max_number, spec.max_target):
        key = jax.random.fold_in(key, value)
    return key


_HELDOUT_CHUNK = 1024


def heldout_problems(spec: CountdownSpec, num: int, seed: int = 0) -> Problems:
    """A deterministic held-out set of `num` distinct problems (host side; numpy arrays in a Problems).

    Chunk c of 1024 problems is `generate_problems(fold_in(heldout_key(spec, seed), c), 1024, spec)`; the
    held-out set is the first `num` distinct problems (by `problem_hashes`) in chunk order. Every run with the
    same spec and seed shares it, and a smaller `num` gives a prefix of a larger one. Raises a ValueError if
    the generator's support is too small to yield `num` distinct problems within 64 chunks.
    """
    num = _check_count(num, "num")
    check_spec(spec)
    base = heldout_key(spec, seed)
    chunks, seen, found = [], set(), 0
    for chunk in range(64):
        drawn = _generate_problems(jax.random.fold_in(base, chunk), _HELDOUT_CHUNK, spec)
        hashes = np.asarray(_problem_hashes(drawn))
        _, first = np.unique(hashes, return_index=True)  # the first occurrence of each hash in this chunk
        first = np.sort(first)
        first = first[[int(h) not in seen for h in hashes[first]]][: num - found]
        seen.update(hashes[first].tolist())
        chunks.append(jax.tree.map(lambda a: np.asarray(a)[first], drawn))
        found += len(first)
        if found == num:
            return jax.tree.map(lambda *parts: np.concatenate(parts), *chunks)
    raise ValueError(f"heldout_problems: only {found} distinct problems found for {spec} in "
                     f"{64 * _HELDOUT_CHUNK} draws, fewer than num={num}; use a smaller num or a larger spec.")


def heldout_mass(heldout: Problems, spec: CountdownSpec, num_draws: int = 4096, seed: int = 0) -> float:
    """Share of the generator's law taken by a held-out set: the fraction of `num_draws` fresh problems
    (`generate_problems(key(seed), num_draws, spec)`) that are in it (host side)."""
    draws = _generate_problems(jax.random.key(seed), _check_count(num_draws, "num_draws"), spec)
    return float(np.mean(np.isin(np.asarray(_problem_hashes(draws)), hash_table(heldout))))


_generate_problems = jax.jit(generate_problems, static_argnums=(1, 2))
_problem_hashes = jax.jit(problem_hashes)


# ----------------------------------------------------------------------------------------------------------
# Debugging helpers (host side).


def detokenize(tokens) -> str:
    """Text of a 1-D token sequence: digits, '+-*/()', ',' '=' ':' , '_' for PAD, '<bos>', '<eos>',
    '<reserved:i>' for other ids. `parse_text` inverts it exactly."""
    return "".join(TOKEN_TEXT.get(int(t), f"<reserved:{int(t)}>") for t in np.asarray(tokens).reshape(-1))


_TEXT_TOKEN = {text: token for token, text in TOKEN_TEXT.items()}


def parse_text(text: str) -> np.ndarray:
    """Token ids int32 [T] of a text in `detokenize`'s alphabet (whitespace ignored), e.g.
    parse_text("(3+5)*2<eos>"). Raises a ValueError on any other character."""
    tokens, i = [], 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
        elif char == "<":
            end = text.find(">", i)
            word = text[i:end + 1]
            if word.startswith("<reserved:") and end > 0:
                tokens.append(int(word[len("<reserved:"):-1]))
            elif word in _TEXT_TOKEN:
                tokens.append(_TEXT_TOKEN[word])
            else:
                raise ValueError(f"parse_text: unknown token {text[i:i + 12]!r} at position {i}.")
            i = end + 1
        elif char in _TEXT_TOKEN:
            tokens.append(_TEXT_TOKEN[char])
            i += 1
        else:
            raise ValueError(f"parse_text: character {char!r} at position {i} is not in the vocabulary.")
    return np.asarray(tokens, np.int32)


# ----------------------------------------------------------------------------------------------------------
# The Task a trainer runs (maxrl_jax/tasks/base.py): configs/countdown.py.


# A held-out set taking more than this share of the problem distribution is refused (training draws would
# need many redraws).
MAX_HELDOUT_SHARE = 0.5


def spec_from_config(config) -> CountdownSpec:
    """The CountdownSpec of config.countdown; a ValueError naming `config.countdown.<field>` otherwise."""
    block = config.countdown
    try:
        return CountdownSpec(num_numbers=block.num_numbers, max_number=block.max_number,
                             max_target=block.max_target)
    except ValueError as e:
        raise ValueError(str(e).replace("CountdownSpec.", "config.countdown.")) from e


class CountdownTask(base.TokenTask):
    """Countdown on the RL trainer: SFT on canonical solutions, RL with the exact on-device verifier.

    Data streams (keys from the trainer): SFT batch of step s = `sft_batch(fold_in(sft_key, s), ...)`, RL batch
    of step s = `draw_training_problems(fold_in(rl_key, s), P, ...)`, both excluding the held-out problems
    (`heldout_problems(spec, eval.num_problems, countdown.heldout_seed)`, shared by every run of the spec), and
    summary.json reports the overlap of every problem the run trained on with the held-out set (0).
    """

    stop_tokens = (EOS,)
    pad_id = PAD
    seed_fields = ("training_problems",)

    def __init__(self, config):
        super().__init__(config)
        self.spec = None

    def validate(self) -> None:
        config = self.config
        spec = self.spec = spec_from_config(config)

        def fail(field, message):
            raise ValueError(f"config.{field}: {message}")

        for field in ("eval.num_problems", "eval.prompt_chunk"):
            group, name = field.split(".")
            value = config[group][name]
            if isinstance(value, bool) or int(value) != value or value < 1:
                fail(field, f"{value!r} must be an integer >= 1.")
        if config.eval.num_problems % config.eval.prompt_chunk:
            fail("eval.prompt_chunk",
                 f"{config.eval.prompt_chunk} must divide eval.num_problems={config.eval.num_problems}.")
        need = max_response_length(spec)
        if config.rollout.max_new_tokens < need:
            fail("rollout.max_new_tokens", f"{config.rollout.max_new_tokens} is shorter than the longest canonical "
                 f"solution and its EOS ({need} tokens); use >= {need}.")
        longest = prompt_length(spec) + max(config.rollout.max_new_tokens, need)
        if config.model.max_positions < longest:
            fail("model.max_positions", f"{config.model.max_positions} < prompt ({prompt_length(spec)}) + response "
                 f"({longest - prompt_length(spec)}) tokens; use >= {longest}.")
        if config.model.vocab_size < VOCAB_SIZE:
            fail("model.vocab_size", f"{config.model.vocab_size} < the Countdown vocabulary ({VOCAB_SIZE}).")
        from maxrl_jax.models import decoder  # pylint: disable=import-outside-toplevel
        try:
            decoder.DecoderConfig.from_config(config.model)
        except (ValueError, TypeError) as e:
            fail("model", str(e))

    def prompt_length(self) -> int:
        return prompt_length(spec_from_config(self.config))

    def batch_sizes(self) -> dict[str, int]:
        return {"eval.prompt_chunk": self.config.eval.prompt_chunk}

    def model_config(self):
        from maxrl_jax.models import decoder  # pylint: disable=import-outside-toplevel
        return decoder.DecoderConfig.from_config(self.config.model)

    def prepare(self, workdir: str) -> None:
        del workdir  # Everything is generated from the spec: nothing is written.
        config = self.config
        self.spec = spec_from_config(config)
        self.heldout_set = heldout_problems(self.spec, config.eval.num_problems, config.countdown.heldout_seed)
        self.heldout_table = jnp.asarray(hash_table(self.heldout_set))
        share = heldout_mass(self.heldout_set, self.spec)
        if share > MAX_HELDOUT_SHARE:
            raise ValueError(
                f"config.eval.num_problems / config.countdown: the {config.eval.num_problems} held-out problems make "
                f"up {share:.0%} of the problems {self.spec} draws, so training problems cannot be drawn without "
                "them. Use fewer eval.num_problems or a larger countdown.max_number / max_target.")
        self.heldout = {"num_problems": int(config.eval.num_problems), "share_of_distribution": share,
                        "seed": int(config.countdown.heldout_seed)}

    def sft_batch(self, key, step):
        batch = sft_batch(jax.random.fold_in(key, step), self.config.sft.batch_size, self.spec, self.heldout_table)
        return {"inputs": batch["inputs"], "loss_mask": batch["loss_mask"]}

    def rl_batch(self, key, step):
        return draw_training_problems(jax.random.fold_in(key, step), self.config.rollout.num_prompts, self.spec,
                                      self.heldout_table)[0]

    def prompts(self, batch):
        return encode_prompts(batch, self.spec)

    def verify(self, batch, responses):
        return verify_groups(batch, responses)

    def heldout_batches(self):
        chunk = self.config.eval.prompt_chunk
        problems = Problems(numbers=jnp.asarray(self.heldout_set.numbers), target=jnp.asarray(self.heldout_set.target))
        return [(i, jax.tree.map(lambda x: x[i:i + chunk], problems))
                for i in range(0, self.config.eval.num_problems, chunk)]

    def heldout_metrics(self, counts, num_samples):
        return metrics_lib.heldout_summary(counts, num_samples, tuple(self.config.eval.ks))

    def training_problems(self, sft: tuple, rl: tuple) -> dict:
        """{"drawn", "distinct", "overlap_with_heldout"} of every problem one seed trained on, regenerated."""
        sft_key, sft_steps, sft_size = sft
        rl_key, rl_steps = rl
        draws = [(sft_key, sft_steps, sft_size), (rl_key, rl_steps, self.config.rollout.num_prompts)]
        hashes = []
        for key, steps, size in draws:
            if not steps:
                continue
            keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(1, steps + 1))
            draw = jax.jit(jax.vmap(lambda k: problem_hashes(
                draw_training_problems(k, size, self.spec, self.heldout_table)[0])))
            hashes.extend(np.asarray(draw(keys[i:i + 256])).ravel() for i in range(0, steps, 256))
        drawn = np.concatenate(hashes) if hashes else np.zeros((0,), np.uint32)
        heldout = set(np.asarray(hash_table(self.heldout_set)).tolist())
        distinct = set(drawn.tolist())
        report = {"drawn": int(drawn.size), "distinct": len(distinct), "overlap_with_heldout": len(distinct & heldout)}
        if report["overlap_with_heldout"]:
            raise RuntimeError(f"{report['overlap_with_heldout']} held-out problems were drawn for training "
                               f"({report}); the held-out results are not valid.")
        return report

    def summary_fields(self, runs, per_seed: bool = False) -> dict:
        reports = {f"seed{r['seed']}": self.training_problems(r["sft"], r["rl"]) for r in runs}
        return {"heldout_problems": self.heldout, "eval_num_problems": self.config.eval.num_problems,
                "eval_num_samples": self.config.eval.num_samples,
                "training_problems": reports if per_seed else reports[f"seed{runs[0]['seed']}"]}

    def table_title(self) -> str:
        config, spec = self.config, spec_from_config(self.config)
        return (f"Held-out Countdown problems ({config.eval.num_problems} problems of {spec.num_numbers} numbers in "
                f"1..{spec.max_number}, targets 1..{spec.max_target}, never trained on; {config.eval.num_samples} "
                f"samples each, temperature {config.eval.temperature}; ± standard error over problems)")

    def table_note(self, summary: dict) -> str:
        training = summary["training_problems"]
        return (f" Trained on {training['distinct']} distinct problems, {training['overlap_with_heldout']} of them "
                "held out.")

    def expected_work(self) -> dict[str, str]:
        spec = spec_from_config(self.config)
        return {"problems": f"{spec.num_numbers} numbers in 1..{spec.max_number}, targets 1..{spec.max_target}; "
                            f"prompt {prompt_length(spec)} tokens, responses up to {self.config.rollout.max_new_tokens}",
                "held-out set": f"{self.config.eval.num_problems} problems, never trained on"}

    def sft_sequence_length(self) -> int:
        spec = spec_from_config(self.config)
        return prompt_length(spec) + max_response_length(spec)


def make_task(config) -> CountdownTask:
    return CountdownTask(config)
