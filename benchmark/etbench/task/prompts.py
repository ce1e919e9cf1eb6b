"""The paper's entity-tracking prompts.

``The apple is in Box F, the key is in Box Q, … . Box Q contains the`` → `` key``

A *context* assigns ``n_boxes`` distinct objects (from the paper's 85-noun list) to ``n_boxes``
distinct capital-letter box labels. As in the paper's dataset, every context is queried once per
box, in segment order, so a dataset is a sequence of blocks of ``n_boxes`` consecutive examples
that share a context (the paper's block layout; several analyses rely on it).

Generation is text-only and tokenizer-free; ``etbench.task.layout`` maps the character spans recorded
here to token positions for a given tokenizer.
"""

from __future__ import annotations

import csv
import random
import string
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from typing import Any

from etbench.core.checks import MAX_ITEMS
from etbench.core.errors import EtbenchError

LABELS: tuple[str, ...] = tuple(string.ascii_uppercase)
MIN_BOXES, MAX_BOXES = 2, len(LABELS)
DEFAULT_N_BOXES = 7

#: The canonical evaluation set: the first 500 examples of the seed-0 stream, as the paper used the
#: first 500 lines of its dataset. The lm-eval task YAMLs restate these values (a test checks it).
CANONICAL_N = 500
CANONICAL_SEED = 0

# Source alterations of the paper's eleven additional desiderata (docs/method.md §1). Each changes only how
# a source prompt is *worded*; the underlying context (objects, labels, query) is unchanged.
ALTERATIONS: tuple[str, ...] = (
    "random_text_start",
    "random_text_end",
    "add_tokens_btw_box_and_obj",
    "add_seg_start",
    "add_seg_end",
    "add_box_before_correct_segment",
    "altered_box_obj_order",
    "altered_box_obj_association",
    "no_comma",
    "add_comma",
)
# The extra segment of add_seg_start/add_seg_end; contexts that use it must avoid this object/label.
EXTRA_SEGMENT_OBJECT, EXTRA_SEGMENT_LABEL = "apple", "O"


@dataclass(frozen=True)
class Wording:
    """How a segment and the query are worded. Every wording names each object before its label and ends
    the query with the word before the answer, as the paper's does, so positions (query label, its earlier
    copy, last token) and every analysis carry over unchanged."""

    before_object: str  # segment: before_object + object + before_label + label
    before_label: str
    before_query_label: str  # after the context's last segment
    after_query_label: str  # ends the prompt; the answer follows


#: The paper's template and two meaning-preserving rewordings held out from every fine-tune (the zoo and the
#: tiny/gemma pairs train on the paper's template, the crate wording "a key sits inside crate Q; ... . Crate Q
#: holds a", arithmetic or conversations), for robustness across wordings (docs/method.md §14).
WORDINGS: dict[str, Wording] = {
    "paper": Wording("the ", " is in Box ", ". Box ", " contains the"),
    "stored": Wording("the ", " is stored in Box ", ". The item stored in Box ", " is the"),
    "bin": Wording("the ", " went into Bin ", ". Bin ", " now contains the"),
}
DEFAULT_WORDING = "paper"


@lru_cache(maxsize=1)
def paper_objects() -> tuple[str, ...]:
    """The paper's 85 objects (``data/objects.csv`` of the reference repository), in file order."""
    text = resources.files("etbench").joinpath("assets/objects.csv").read_text(encoding="utf-8")
    return tuple(row["object_name"] for row in csv.DictReader(text.splitlines()))


@dataclass(frozen=True)
class Span:
    """Half-open character span ``text[start:end]`` of one word."""

    start: int
    end: int


@dataclass(frozen=True)
class Rendered:
    """A prompt's text with the character span of every word the analyses point at."""

    prompt: str
    object_spans: tuple[Span, ...]
    label_spans: tuple[Span, ...]
    query_label_span: Span


@dataclass(frozen=True)
class Example:
    """One prompt: a context (objects[i] is in Box labels[i]) and a query.

    ``query_label`` is normally ``labels[query_index]``; a path-patching noise prompt replaces it
    by a random letter, in which case ``query_index`` is the segment the letter replaced (kept for
    bookkeeping) and ``answer`` is undefined. ``alteration`` rewords the prompt (see ALTERATIONS).
    """

    objects: tuple[str, ...]
    labels: tuple[str, ...]
    query_index: int
    context_id: int = 0
    query_label: str = ""
    alteration: str | None = None
    wording: str = DEFAULT_WORDING

    def __post_init__(self) -> None:
        if not self.query_label:
            object.__setattr__(self, "query_label", self.labels[self.query_index])
        if self.alteration is not None and self.alteration not in ALTERATIONS:
            raise EtbenchError(f"unknown alteration {self.alteration!r}; known: {', '.join(ALTERATIONS)}")
        check_wording(self.wording)
        if self.alteration is not None and self.wording != DEFAULT_WORDING:
            raise EtbenchError(f"alterations reword the paper's template; the {self.wording!r} wording has none")

    @property
    def n_boxes(self) -> int:
        return len(self.objects)

    @property
    def answer(self) -> str:
        """The correct object (without the leading space)."""
        if self.query_label != self.labels[self.query_index]:
            raise EtbenchError("this example's query label is not in its context: it has no answer")
        return self.objects[self.query_index]

    @property
    def prompt(self) -> str:
        return render(self).prompt

    @property
    def target(self) -> str:
        """The continuation scored by the paper's metric: the answer with its leading space."""
        return " " + self.answer

    @property
    def sentence(self) -> str:
        """The full sentence in the paper's dataset (prompt + answer + '.')."""
        return f"{self.prompt} {self.answer}."

    def with_query(self, query_index: int) -> Example:
        return replace(self, query_index=query_index, query_label="")

    def to_record(self) -> dict[str, Any]:
        """etbench's own row format (also the ``datasets.Dataset`` schema)."""
        return {
            "context_id": self.context_id,
            "n_boxes": self.n_boxes,
            "objects": list(self.objects),
            "labels": list(self.labels),
            "query_index": self.query_index,
            "query_label": self.query_label,
            "prompt": self.prompt,
            "answer": self.answer,
            "target": self.target,
            "choices": list(self.objects),
            "label": self.query_index,
        }

    def to_paper_record(self, sample_id: int) -> dict[str, Any]:
        """A row in the paper's (Kim & Schuster's) JSONL schema; the reference code reads ``sentence``."""
        head = self.prompt[: -len(" the")]
        return {
            "sentence": self.sentence,
            "sentence_masked": f"{head} <extra_id_0> .",
            "masked_content": f"<extra_id_0> the {self.answer}",
            "sample_id": sample_id,
            "numops": 0,
            "numops_by_op": {"move": 0, "remove": 0, "put": 0},
        }


def _segment_words(example: Example, i: int) -> list[tuple[str, str | None]]:
    """The words of segment i as (text, role) pieces; role marks the words whose span is kept."""
    obj, label = example.objects[i], example.labels[i]
    if example.wording != DEFAULT_WORDING:
        w = WORDINGS[example.wording]
        return [(w.before_object, None), (obj, "object"), (w.before_label, None), (label, "label")]
    queried = i == example.query_index
    alt = example.alteration
    if queried and alt == "altered_box_obj_order":
        return [("Box ", None), (label, "label"), (" contains the ", None), (obj, "object")]
    verb = " is in Box "
    if queried and alt == "add_tokens_btw_box_and_obj":
        verb = " is contained in the Box "
    elif queried and alt == "altered_box_obj_association":
        verb = " is not in Box "
    elif alt == "add_comma":
        verb = ", is in Box "
    return [("the ", None), (obj, "object"), (verb, None), (label, "label")]


def render(example: Example) -> Rendered:
    """Build the prompt text piece by piece, recording the span of every object and label."""
    alt = example.alteration
    pieces: list[tuple[str, str | None]] = []
    if alt == "random_text_start":
        pieces.append(("There are a bunch of boxes containing objects, ", None))
    elif alt == "add_seg_start":
        pieces.append((f"The {EXTRA_SEGMENT_OBJECT} is in Box {EXTRA_SEGMENT_LABEL}, ", None))
    separator = " " if alt == "no_comma" else ", "
    for i in range(example.n_boxes):
        if i:
            pieces.append((separator, None))
        if alt == "add_box_before_correct_segment" and i == example.query_index:
            pieces.append(("there are three additional boxes, Box PP, Box BB and Box AA, ", None))
        pieces.extend(_segment_words(example, i))
    if alt == "random_text_end":
        pieces.append((", these are a bunch of boxes containing objects", None))
    elif alt == "add_seg_end":
        pieces.append((f", the {EXTRA_SEGMENT_OBJECT} is in Box {EXTRA_SEGMENT_LABEL}", None))
    w = WORDINGS[example.wording]
    pieces.append((w.before_query_label, None))
    pieces.append((example.query_label, "query_label"))
    pieces.append((w.after_query_label, None))

    text, objects, labels, query = "", [], [], None
    for piece, role in pieces:
        span = Span(len(text), len(text) + len(piece))
        text += piece
        if role == "object":
            objects.append(span)
        elif role == "label":
            labels.append(span)
        elif role == "query_label":
            query = span
    # The sentence starts with a capital, whatever piece comes first (the paper's "The apple …").
    text = text[0].upper() + text[1:]
    assert query is not None
    return Rendered(text, tuple(objects), tuple(labels), query)


def _check_sizes(n_boxes: int, n: int, pool: tuple[str, ...]) -> None:
    if not MIN_BOXES <= n_boxes <= MAX_BOXES:
        raise EtbenchError(
            f"n_boxes must be between {MIN_BOXES} and {MAX_BOXES} (one capital letter per box), got {n_boxes}"
        )
    if not 1 <= n <= MAX_ITEMS:
        raise EtbenchError(f"the number of examples must be between 1 and {MAX_ITEMS}, got {n}")
    if len(pool) < n_boxes:
        raise EtbenchError(f"{n_boxes} boxes need {n_boxes} distinct objects, but only {len(pool)} are available")


def check_wording(wording: str) -> None:
    if wording not in WORDINGS:
        raise EtbenchError(f"unknown wording {wording!r}; known: {', '.join(WORDINGS)}")


def stream_rng(*parts: object) -> random.Random:
    """A named random stream. A string seed is hashed with SHA-512 by ``random.Random``, so the
    stream is the same on every machine and Python version (unlike ``hash()``-based seeding)."""
    return random.Random(":".join(["etbench", *map(str, parts)]))


def sample_context(
    rng: random.Random,
    n_boxes: int,
    objects: tuple[str, ...],
    labels: tuple[str, ...] = LABELS,
    context_id: int = 0,
) -> Example:
    """A fresh context (queried at segment 0): distinct objects, distinct labels, uniformly drawn."""
    return Example(
        objects=tuple(rng.sample(objects, n_boxes)),
        labels=tuple(rng.sample(labels, n_boxes)),
        query_index=0,
        context_id=context_id,
    )


def generate(
    n_boxes: int = DEFAULT_N_BOXES,
    n: int = CANONICAL_N,
    seed: int = CANONICAL_SEED,
    objects: tuple[str, ...] | None = None,
    labels: tuple[str, ...] = LABELS,
    wording: str = DEFAULT_WORDING,
) -> list[Example]:
    """The first ``n`` examples of the seeded stream: contexts in blocks of ``n_boxes``, each box
    queried once in segment order (a partial last block when n is not a multiple of n_boxes).
    ``wording`` words them (``WORDINGS``); the contexts and queries are the same in every wording."""
    pool = paper_objects() if objects is None else tuple(objects)
    _check_sizes(n_boxes, n, pool)
    check_wording(wording)
    if len(labels) < n_boxes:
        raise EtbenchError(f"{n_boxes} boxes need {n_boxes} distinct labels, but only {len(labels)} are usable")
    rng = stream_rng("data", seed, n_boxes)
    examples: list[Example] = []
    context_id = 0
    while len(examples) < n:
        context = sample_context(rng, n_boxes, pool, labels, context_id)
        for q in range(n_boxes):
            if len(examples) == n:
                break
            examples.append(replace(context.with_query(q), wording=wording))
        context_id += 1
    return examples


def to_dataset(examples: list[Example]):
    """A ``datasets.Dataset`` view (etbench's record schema)."""
    import datasets

    return datasets.Dataset.from_list([ex.to_record() for ex in examples])


def paper_records(examples: list[Example]) -> list[dict[str, Any]]:
    """Rows in the paper's JSONL schema; ``sample_id`` numbers the contexts, as in the paper's file."""
    return [ex.to_paper_record(ex.context_id) for ex in examples]

