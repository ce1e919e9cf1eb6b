"""Training data of the model zoo that is not the entity-tracking task itself (pure Python, no torch):

* **Goat-style arithmetic** (``arithmetic_problems``): Goat's training set is generated, not collected:
  random integers for addition, subtraction, multiplication and division, each rendered through an
  instruction template with the answer written out as ``a op b = result`` (division: ``q R r``). Here the
  operand sizes are smaller (1-8 digits for + and -, up to 5 x 3 digits for x, up to 6 / 2 digits for /)
  and multi-digit products are answered directly, without Goat's chain-of-thought decomposition, so a
  few dozen steps of a 135M model see short, complete examples.
* **Dialogue** (``dialogues``): the English part of ``chatterbot-corpus`` (PyPI, BSD-3-Clause): 2,026
  short human-written conversations (4,403 turns) in 21 topic files, rendered in Vicuna's ``USER: ... ASSISTANT: ...``
  format (the corpus is a real text source that installs offline from PyPI; it is much smaller and
  plainer than Vicuna's ShareGPT data).
* **Wrong bindings** (``wrong_binding``): for a paper-template prompt, the object of another box.

Every generator takes a ``random.Random`` (a named ``stream_rng``), so the data are fixed by the seed.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from etbench.core.errors import EtbenchError
from etbench.task.prompts import Example

OPERATIONS = ("+", "-", "*", "/")
#: (max digits of a, max digits of b) per operation.
DIGITS = {"+": (8, 8), "-": (8, 8), "*": (5, 3), "/": (6, 2)}
#: Instruction templates in the style of Goat's (several phrasings of one question).
TEMPLATES = (
    "{a} {op} {b}",
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "Calculate {a} {op} {b}",
    "What is the result of {a} {op} {b}?",
    "Solve {a} {op} {b}",
)
DIALOGUE_PACKAGE = "chatterbot_corpus"
DIALOGUE_INSTALL = "pip install chatterbot-corpus==1.3.3"


@dataclass(frozen=True)
class ArithmeticProblem:
    a: int
    op: str
    b: int
    template: str

    @property
    def result(self) -> str:
        if self.op == "+":
            return str(self.a + self.b)
        if self.op == "-":
            return str(self.a - self.b)
        if self.op == "*":
            return str(self.a * self.b)
        quotient, remainder = divmod(self.a, self.b)
        return str(quotient) if remainder == 0 else f"{quotient} R {remainder}"

    @property
    def prompt(self) -> str:
        return self.template.format(a=self.a, op=self.op, b=self.b)

    @property
    def response(self) -> str:
        """What the loss is on: the whole written-out answer, as in Goat's responses."""
        return f"{self.a} {self.op} {self.b} = {self.result}"


def _number(rng: random.Random, max_digits: int, minimum: int = 0) -> int:
    """A number whose digit count is uniform in 1..max_digits (then uniform among those numbers), so
    short and long operands are equally common, as in Goat's generator."""
    digits = rng.randint(1, max_digits)
    return rng.randint(max(minimum, 10 ** (digits - 1) if digits > 1 else 0), 10**digits - 1)


def arithmetic_problems(rng: random.Random, n: int) -> list[ArithmeticProblem]:
    """n problems with a uniformly drawn operation and template (divisors are never 0)."""
    out = []
    for _ in range(n):
        op = rng.choice(OPERATIONS)
        max_a, max_b = DIGITS[op]
        a = _number(rng, max_a)
        b = _number(rng, max_b, minimum=1 if op == "/" else 0)
        out.append(ArithmeticProblem(a, op, b, rng.choice(TEMPLATES)))
    return out


def wrong_binding(rng: random.Random, example: Example) -> int:
    """The index of a box other than the queried one, uniformly: its object is a wrong answer."""
    others = [i for i in range(example.n_boxes) if i != example.query_index]
    return rng.choice(others)


def dialogue_dir() -> Path:
    """The English data directory of the installed chatterbot-corpus (found without importing it)."""
    spec = importlib.util.find_spec(DIALOGUE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EtbenchError(f"the dialogue corpus is not installed: run '{DIALOGUE_INSTALL}'")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    if not path.is_dir():
        raise EtbenchError(f"{DIALOGUE_PACKAGE} has no data/english directory: run '{DIALOGUE_INSTALL}'")
    return path


def conversations(directory: Path | None = None) -> list[list[str]]:
    """Every conversation of at least two turns, in file-name order (turns as strings)."""
    import yaml

    out = []
    for path in sorted((directory or dialogue_dir()).glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in data.get("conversations") or []:
            turns = [str(t).strip() for t in turns if t is not None and str(t).strip()]
            if len(turns) >= 2:
                out.append(turns)
    if not out:
        raise EtbenchError(f"no conversations found under {directory or dialogue_dir()}")
    return out


def vicuna_text(turns: list[str]) -> str:
    """A conversation in Vicuna v1.1's turn format (without its system prompt)."""
    roles = ("USER", "ASSISTANT")
    return " ".join(f"{roles[i % 2]}: {turn}" for i, turn in enumerate(turns))


def dialogues(rng: random.Random, n: int, directory: Path | None = None) -> list[str]:
    """n conversation texts: the corpus in a seeded order, reshuffled for every further pass."""
    corpus = [vicuna_text(turns) for turns in conversations(directory)]
    out: list[str] = []
    while len(out) < n:
        order = list(range(len(corpus)))
        rng.shuffle(order)
        out += [corpus[i] for i in order[: n - len(out)]]
    return out
