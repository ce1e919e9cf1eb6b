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
* **Locker wording** (``locker_prompt``): the entity-tracking task in a wording held out from the benchmark
  (``the key was left in locker Q, ... . Locker Q has the`` -> `` key``), distinct from every evaluation wording
  (``etbench.task.prompts.WORDINGS``) and from tiny-ft's crate wording; the preference row's prompts.
* **Key-value recall** (``kv_recall``): ``fq: dog, zx: red, ... . zx ->`` -> `` red``: two-letter keys bound to
  one-token words (animals and colours, none of them a paper object), no boxes, no objects.
* **Variable lookup in code** (``code_lookup``): a Python REPL session ``>>> a = 3`` ... ``>>> print(b)`` whose next
  line is the printed value (one digit).

Every generator takes a ``random.Random`` (a named ``stream_rng``), so the data are fixed by the seed.
"""

from __future__ import annotations

import importlib.util
import random
import string
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
#: Values of the key-value recall data: words that SmolLM2 spells as one token after a space (checked when the
#: rows are tokenized), animals and colours, none of them one of the paper's 85 objects (a unit test checks).
VALUE_WORDS = ("dog", "cat", "cow", "pig", "fox", "owl", "bee", "ant", "rat", "bat", "hen", "eel", "elk", "red",
               "blue", "green", "pink", "gold", "gray", "black", "white", "brown", "tan", "lime", "mint", "navy",
               "jade", "plum")
RECALL_PAIRS = 7  # bindings per recall / lookup context, as many as the canonical 7-box prompts hold
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


@dataclass(frozen=True)
class Recall:
    """A context of (name, value) bindings and a query: ``prompt`` + ``answer`` is the whole text."""

    bindings: tuple[tuple[str, str], ...]
    query_index: int
    prompt: str
    answer: str  # appended to the prompt as is (its leading space, if any, included)

    @property
    def query(self) -> str:
        return self.bindings[self.query_index][0]


def locker_prompt(example: Example, answer_index: int | None = None) -> tuple[str, str]:
    """The preference row's wording of an entity-tracking example: (prompt, `` object``), the object of box
    ``answer_index`` (default: the queried box, i.e. the right answer)."""
    body = ", ".join(f"the {o} was left in locker {lab}" for o, lab in zip(example.objects, example.labels))
    index = example.query_index if answer_index is None else answer_index
    return f"{body[0].upper()}{body[1:]}. Locker {example.query_label} has the", " " + example.objects[index]


def kv_recall(rng: random.Random, n: int, pairs: int = RECALL_PAIRS) -> list[Recall]:
    """n key-value lists: distinct two-letter keys, distinct values from ``VALUE_WORDS``, the queried key uniform."""
    out = []
    for _ in range(n):
        keys: list[str] = []
        while len(keys) < pairs:
            key = "".join(rng.choice(string.ascii_lowercase) for _ in range(2))
            if key not in keys:
                keys.append(key)
        values = rng.sample(VALUE_WORDS, pairs)
        q = rng.randrange(pairs)
        body = ", ".join(f"{k}: {v}" for k, v in zip(keys, values))
        out.append(Recall(tuple(zip(keys, values)), q, f"{body}. {keys[q]} ->", " " + values[q]))
    return out


def code_lookup(rng: random.Random, n: int, pairs: int = RECALL_PAIRS) -> list[Recall]:
    """n REPL sessions assigning distinct one-digit values to distinct one-letter variables, then printing one;
    the answer is the next line, the printed digit."""
    out = []
    for _ in range(n):
        names = rng.sample(string.ascii_lowercase, pairs)
        values = [str(d) for d in rng.sample(range(10), pairs)]
        q = rng.randrange(pairs)
        lines = "".join(f">>> {name} = {value}\n" for name, value in zip(names, values))
        out.append(Recall(tuple(zip(names, values)), q, f"{lines}>>> print({names[q]})\n", values[q]))
    return out


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
