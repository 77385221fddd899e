"""Plain-Python reference for the Countdown task, written from the task's rules and independent of the JAX code.

The verifier here is a recursive-descent parser over the response's text with exact rational arithmetic
(fractions.Fraction), where a division counts only if it is exact in integers; the JAX verifier is a
shunting-yard stack machine, so the two share no code. Token ids are written out here from the task
description rather than imported, so a wrong constant in `maxrl_jax.tasks.countdown` is caught by the tests.
"""

from __future__ import annotations

import fractions
import functools
import itertools

PAD, BOS, EOS = 0, 1, 2
CHARS = {3 + d: str(d) for d in range(10)} | {13: "+", 14: "-", 15: "*", 16: "/", 17: "(", 18: ")"}
TOKENS = {char: token for token, char in CHARS.items()}
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


class Invalid(Exception):
    """The response breaks a rule; the message says which (a `verify` reason)."""


def response_text(response) -> str:
    """The expression text of the tokens before the first EOS; Invalid if there is no EOS or a foreign token."""
    response = [int(token) for token in response]
    if EOS not in response:
        raise Invalid("no EOS")
    body = response[: response.index(EOS)]
    if any(token not in CHARS for token in body):
        raise Invalid("foreign token")
    return "".join(CHARS[token] for token in body)


def text_tokens(text: str) -> list[int]:
    """Token ids of an expression text over '0-9+-*/()' (no EOS)."""
    return [TOKENS[char] for char in text]


class _Parser:
    """expr := term (('+' | '-') term)*; term := factor (('*' | '/') factor)*; factor := NUMBER | '(' expr ')';
    NUMBER := '0' | [1-9][0-9]*. Builds the tree: an int leaf or (op, left, right)."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def peek(self):
        return self.text[self.pos] if self.pos < len(self.text) else None

    def parse(self):
        if not self.text:
            raise Invalid("malformed")
        tree = self.expr()
        if self.pos != len(self.text):
            raise Invalid("malformed")
        return tree

    def expr(self):
        tree = self.term()
        while self.peek() in ("+", "-"):
            op = self.text[self.pos]
            self.pos += 1
            tree = (op, tree, self.term())
        return tree

    def term(self):
        tree = self.factor()
        while self.peek() in ("*", "/"):
            op = self.text[self.pos]
            self.pos += 1
            tree = (op, tree, self.factor())
        return tree

    def factor(self):
        char = self.peek()
        if char == "(":
            self.pos += 1
            tree = self.expr()
            if self.peek() != ")":
                raise Invalid("malformed")
            self.pos += 1
            return tree
        if char is not None and char.isdigit():
            start = self.pos
            while self.peek() is not None and self.peek().isdigit():
                self.pos += 1
            literal = self.text[start:self.pos]
            if len(literal) > 1 and literal[0] == "0":
                raise Invalid("leading zero")
            return int(literal)
        raise Invalid("malformed")


def parse(text: str):
    """The expression tree of `text` (an int leaf or (op, left, right)); Invalid if it is not well formed."""
    return _Parser(text).parse()


def leaves(tree) -> list[int]:
    return [tree] if isinstance(tree, int) else leaves(tree[1]) + leaves(tree[2])


def evaluate(tree) -> fractions.Fraction:
    """Exact value; Invalid('division by zero' / 'inexact division') at any division that is not exact."""
    if isinstance(tree, int):
        return fractions.Fraction(tree)
    op, left, right = tree[0], evaluate(tree[1]), evaluate(tree[2])
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if right == 0:
        raise Invalid("division by zero")
    if (left / right).denominator != 1:
        raise Invalid("inexact division")
    return left / right


def rational_value(tree):
    """The value with ordinary rational division (no exactness rule); None on a division by zero."""
    if isinstance(tree, int):
        return fractions.Fraction(tree)
    left, right = rational_value(tree[1]), rational_value(tree[2])
    if left is None or right is None:
        return None
    if tree[0] == "/":
        return None if right == 0 else left / right
    return {"+": left + right, "-": left - right, "*": left * right}[tree[0]]


def check(numbers, target, response) -> str:
    """Why a response scores what it does: 'ok' (reward 1) or the first rule it breaks."""
    try:
        tree = parse(response_text(response))
        if sorted(leaves(tree)) != sorted(int(n) for n in numbers):
            return "numbers differ"
        value = evaluate(tree)
    except Invalid as reason:
        return str(reason)
    return "ok" if value == int(target) else "wrong value"


def verify(numbers, target, response) -> float:
    """The task's verifier: 1.0 iff the tokens before the first EOS are a valid expression over exactly the given
    numbers whose value (every division exact) is the target."""
    return 1.0 if check(numbers, target, response) == "ok" else 0.0


def canonical_text(tree) -> str:
    """Infix with the fewest parentheses that parse back to the same tree: the left child of an operator node is
    parenthesised iff it binds weaker, the right child iff it binds weaker or equally."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    left_text, right_text = canonical_text(left), canonical_text(right)
    if not isinstance(left, int) and PRECEDENCE[left[0]] < PRECEDENCE[op]:
        left_text = f"({left_text})"
    if not isinstance(right, int) and PRECEDENCE[right[0]] <= PRECEDENCE[op]:
        right_text = f"({right_text})"
    return left_text + op + right_text


@functools.lru_cache(maxsize=None)
def reachable(numbers: tuple) -> frozenset:
    """Every value of an expression that uses each of `numbers` (sorted tuple) exactly once, every division exact.

    Brute force: any expression tree is built by repeatedly replacing two values by their combination.
    """
    if len(numbers) == 1:
        return frozenset(numbers)
    values = set()
    for i, j in itertools.permutations(range(len(numbers)), 2):
        rest = [numbers[t] for t in range(len(numbers)) if t not in (i, j)]
        a, b = numbers[i], numbers[j]
        combined = [a + b, a - b, a * b] + ([a // b] if b != 0 and a % b == 0 else [])
        for value in combined:
            values |= reachable(tuple(sorted(rest + [value])))
    return frozenset(values)


def all_trees(numbers):
    """Every expression tree over `numbers` (each used once): all leaf orders, shapes and operators."""
    def trees(items):
        if len(items) == 1:
            yield items[0]
            return
        for split in range(1, len(items)):
            for left in trees(items[:split]):
                for right in trees(items[split:]):
                    for op in "+-*/":
                        yield (op, left, right)
    for order in itertools.permutations(numbers):
        yield from trees(list(order))


def full_text(tree) -> str:
    """Fully parenthesised infix (every operator node in parentheses, the root included)."""
    return str(tree) if isinstance(tree, int) else f"({full_text(tree[1])}{tree[0]}{full_text(tree[2])})"
