"""Counterfactual (base, source) prompt pairs: the path-patching noise prompt and the DCM desiderata.

Each pair says what the *base* model should predict if activations from the *source* run carry a
given kind of information (docs/method.md §1). Two bugs of the reference code are fixed here:

* B1: every target is the object *with its leading space* as the model spells it after
  "... contains the" (the reference looked up the space-less piece for box_label_value, so that
  desideratum scored 0 by construction).
* B2: the source's query segment always differs from the base's (the reference compared against a
  segment that was always 0, so 14% of pairs had identical segments and a no-op patch "succeeded").
  More generally, each pair's target differs from the base's own answer and from the target of the
  competing hypotheses, so that no desideratum can be satisfied by doing nothing.

Sources come one of two ways (``SOURCE_MODES``):

* ``"fresh"``: a fresh random context from a named seeded stream, which is distributionally what the
  reference's "another random line of the dataset" was, without its dependence on file order;
* ``"dataset"``: another base example of the same set, drawn from a named seeded stream and queried at the
  source segment: the reference's "another line of the dataset" itself. Such a source equals its partner's
  base prompt up to the query, so its run can reuse the partner's clean key/value prefix
  (``metrics.dcm.cache_at_positions``): a few tokens instead of a whole prompt. box_label_value draws among
  the examples that already hold the queried label at an allowed segment (about one in five); only when
  none does is a partner's label swapped in, as for a fresh context. The pair records the partner's row
  (``source_row``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Sequence

from etbench.core.errors import EtbenchError
from etbench.task.layout import Layout, layouts, single_token_continuations
from etbench.task.prompts import (
    ALTERATIONS,
    EXTRA_SEGMENT_LABEL,
    EXTRA_SEGMENT_OBJECT,
    LABELS,
    Example,
    paper_objects,
    sample_context,
    stream_rng,
)

#: The paper's eleven additional desiderata (Position Transmitter only), in the reference's order: the ten
#: source rewordings plus the ``incorrect_segment`` control (no rewording, a shifted target).
ADDITIONAL_DESIDERATA: tuple[str, ...] = ALTERATIONS[:6] + ("incorrect_segment",) + ALTERATIONS[6:]
MAIN_DESIDERATA: tuple[str, ...] = ("positional", "object_value", "box_label_value")
DESIDERATA: tuple[str, ...] = MAIN_DESIDERATA + ADDITIONAL_DESIDERATA
NOISE = "noise"  # the path-patching corrupted prompt
SOURCE_MODES: tuple[str, ...] = ("fresh", "dataset")
#: Draws of a dataset partner before giving up on a pair whose constraints no partner meets (e.g. a tiny set)
MAX_PARTNER_DRAWS = 1000


@dataclass(frozen=True)
class CounterfactualPair:
    """Run ``base``, patch in activations from ``source``; under the hypothesis named by ``kind``
    the patched model predicts ``target_object``."""

    kind: str
    base: Example
    source: Example
    target_object: str
    #: the base example (its index in the pair set) the source context was taken from; None for a fresh context
    source_row: int | None = None


@dataclass(frozen=True)
class EncodedPair:
    """A pair with what patching needs for one tokenizer: both layouts and the target token id."""

    pair: CounterfactualPair
    base_layout: Layout
    source_layout: Layout
    target_id: int


def _other_segment(rng: random.Random, n: int, exclude: set[int]) -> int:
    return rng.choice([i for i in range(n) if i not in exclude])


def _pools(objects: Sequence[str] | None, labels: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(paper_objects() if objects is None else objects), tuple(labels)


def noise_pairs(examples: Sequence[Example], seed: int = 0, objects: Sequence[str] | None = None,
                labels: Sequence[str] = LABELS) -> list[CounterfactualPair]:
    """Path patching's corrupted prompts (docs/method.md §4): a fresh context queried at the next segment,
    whose query letter is then replaced by a uniformly random letter (objects, labels and query
    all randomised). The score always uses the base's own answer."""
    objects, labels = _pools(objects, labels)
    pairs = []
    for k, base in enumerate(examples):
        rng = stream_rng("pairs", NOISE, seed, base.n_boxes, k)
        source = sample_context(rng, base.n_boxes, objects, labels)
        segment = (base.query_index + 1) % base.n_boxes
        source = replace(source, query_index=segment, query_label=rng.choice(labels))
        pairs.append(CounterfactualPair(NOISE, base, source, base.answer))
    return pairs


def _desideratum_pair(name: str, base: Example, rng: random.Random, objects: tuple[str, ...],
                      labels: tuple[str, ...], partners: tuple[Sequence[Example], int] | None = None,
                      ) -> CounterfactualPair:
    """One pair; its source context is fresh (``partners`` None) or, for ``partners = (examples, k)``, an
    example of ``examples`` other than the k-th (the base's own row)."""
    n, j = base.n_boxes, base.query_index
    row: int | None = None

    def context(objects: tuple[str, ...], labels: tuple[str, ...]) -> Example:
        nonlocal row
        if partners is None:
            return sample_context(rng, n, objects, labels)
        examples, own = partners
        row = rng.randrange(len(examples) - 1)
        row += row >= own  # uniform over the other rows
        return examples[row]

    if name == "box_label_value":
        if n < 3:
            raise EtbenchError("box_label_value needs at least 3 boxes (its three hypotheses must differ)")
        labelled = _other_segment(rng, n, {j})  # the base box whose label the source will query
        label = base.labels[labelled]
        if partners is not None:
            # another example that has this label at an allowed segment needs no edit: the source is that
            # example queried there, so it shares the example's whole prompt up to the query
            examples, own = partners
            unedited = [(i, e.labels.index(label)) for i, e in enumerate(examples)
                        if i != own and label in e.labels and e.labels.index(label) not in (j, labelled)]
            if unedited:
                row, s = rng.choice(unedited)
                return CounterfactualPair(name, base, examples[row].with_query(s), base.objects[labelled], row)
        s = _other_segment(rng, n, {j, labelled})  # the source's query segment
        source = context(objects, labels)
        src_labels = list(source.labels)
        if label in src_labels:  # keep the source's labels distinct
            src_labels[src_labels.index(label)] = src_labels[s]
        src_labels[s] = label
        source = replace(source, labels=tuple(src_labels)).with_query(s)
        return CounterfactualPair(name, base, source, base.objects[labelled], row)

    if name in ("add_seg_start", "add_seg_end"):  # the extra segment must not clash with the context
        objects = tuple(o for o in objects if o != EXTRA_SEGMENT_OBJECT)
        labels = tuple(lab for lab in labels if lab != EXTRA_SEGMENT_LABEL)
    s = _other_segment(rng, n, {j})
    for _ in range(MAX_PARTNER_DRAWS if partners is not None else 1 << 62):
        source = context(objects, labels).with_query(s)
        # object_value's target (the source's answer) must differ from the no-op and positional ones.
        if name != "object_value" or source.answer not in (base.answer, base.objects[s]):
            break
    else:
        raise EtbenchError(f"{name}: no other example of this set has a source answer that differs from both "
                           "hypotheses' (a set too small for dataset sources)")
    if name == "positional":
        target = base.objects[s]
    elif name == "object_value":
        target = source.answer
    elif name == "incorrect_segment":  # a control: the "wrong" neighbouring segment
        target = base.objects[(s + 1) % n]
    else:
        source = replace(source, alteration=name)
        target = base.objects[s]
    return CounterfactualPair(name, base, source, target, row)


def desideratum_pairs(name: str, examples: Sequence[Example], seed: int = 0, objects: Sequence[str] | None = None,
                      labels: Sequence[str] = LABELS, sources: str = "fresh") -> list[CounterfactualPair]:
    """One pair per base example for a DCM desideratum (docs/method.md §7, with B1/B2 fixed); each source
    context fresh or another example of ``examples`` (``sources``, see the module's docstring)."""
    if name not in DESIDERATA:
        raise EtbenchError(f"unknown desideratum {name!r}; known: {', '.join(DESIDERATA)}")
    if sources not in SOURCE_MODES:
        raise EtbenchError(f"sources must be one of {', '.join(SOURCE_MODES)}, got {sources!r}")
    objects, labels = _pools(objects, labels)
    if sources == "fresh":
        return [_desideratum_pair(name, base, stream_rng("pairs", name, seed, base.n_boxes, k), objects, labels)
                for k, base in enumerate(examples)]
    if name not in MAIN_DESIDERATA:
        # a reworded source shares no prefix with any base prompt, and its extra segment may clash with a partner
        raise EtbenchError(f"dataset sources are for the main desiderata ({', '.join(MAIN_DESIDERATA)}), "
                           f"not {name!r}")
    if len(examples) < 2 or len({e.n_boxes for e in examples}) != 1:
        raise EtbenchError("dataset sources need at least 2 base examples of one box count (a source is "
                           "another example queried at another box)")
    return [_desideratum_pair(name, base, stream_rng("dataset-pairs", name, seed, base.n_boxes, k), objects, labels,
                              (examples, k))
            for k, base in enumerate(examples)]


def make_pairs(kind: str, examples: Sequence[Example], seed: int = 0, objects: Sequence[str] | None = None,
               labels: Sequence[str] = LABELS) -> list[CounterfactualPair]:
    """Pairs of any kind: ``"noise"`` or a desideratum name."""
    if kind == NOISE:
        return noise_pairs(examples, seed, objects, labels)
    return desideratum_pairs(kind, examples, seed, objects, labels)


def encode_pairs(pairs: Sequence[CounterfactualPair], tokenizer) -> list[EncodedPair]:
    """Layouts of both sides and the target token id (the leading-space object token: B1 fixed)."""
    base_layouts = layouts([p.base for p in pairs], tokenizer)
    source_layouts = layouts([p.source for p in pairs], tokenizer)
    target_ids = single_token_continuations(tokenizer, [p.base.prompt for p in pairs],
                                            [" " + p.target_object for p in pairs])
    return [EncodedPair(p, b, s, t) for p, b, s, t in zip(pairs, base_layouts, source_layouts, target_ids)]
