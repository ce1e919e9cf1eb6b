"""Token positions of a prompt for one tokenizer, found by tokenizing (never by fixed offsets).

Every analysis of the paper reads or patches a handful of positions: each object, each box label,
the query label, its earlier occurrence in the context ("previous query label") and the last token.
A word counts as *one token with its leading space* when tokenizing the text up to the word adds
exactly one token to the tokenization of the text up to the space before it, and both are
prefixes of the whole prompt's tokenization. The answer token is found the way lm-eval splits a
(context, continuation) pair: ``tokens(prompt + " obj")[len(tokens(prompt)):]`` must be one token.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from etbench.core.errors import EtbenchError
from etbench.schema.circuit import POSITION_CLASSES
from etbench.task.prompts import LABELS, Example, Span, paper_objects, render


@dataclass(frozen=True)
class Layout:
    """Token ids of an unpadded prompt and the positions that matter in it (0-based)."""

    input_ids: tuple[int, ...]
    object_positions: tuple[int, ...]
    label_positions: tuple[int, ...]
    query_label: int
    prev_query_label: int | None  # None when the query label is not in the context (noise prompts)
    last: int
    target_id: int | None  # None when the prompt has no answer

    @property
    def length(self) -> int:
        return len(self.input_ids)

    def position(self, position_class: str) -> int:
        if position_class not in POSITION_CLASSES:
            raise EtbenchError(f"unknown position class {position_class!r}; known: {', '.join(POSITION_CLASSES)}")
        pos = getattr(self, position_class)
        if pos is None:
            raise EtbenchError(f"this prompt has no {position_class} position")
        return pos


class TokenEncoder:
    """Tokenizes many strings at once and knows how many special tokens the tokenizer prepends."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        probe = "Box A contains the"
        with_special = list(tokenizer(probe)["input_ids"])
        without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        n_prefix = len(with_special) - len(without)
        if n_prefix < 0 or with_special[n_prefix:] != without:
            raise EtbenchError(
                "unsupported tokenizer: it adds special tokens after the text; etbench needs "
                "prompts whose tokens end with the last word"
            )
        self.prefix_ids: list[int] = with_special[:n_prefix]
        self._spelling: dict[int, str] = {}

    def spells(self, token_id: int, word: str) -> bool:
        """Whether the token decodes to the word (an <unk> for an unknown word does not)."""
        if token_id not in self._spelling:
            self._spelling[token_id] = self.tokenizer.decode([token_id]).strip()
        return self._spelling[token_id] == word

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _word_queries(text: str, spans: Sequence[Span]) -> list[str]:
    out = []
    for span in spans:
        if span.start == 0 or text[span.start - 1] != " ":
            raise EtbenchError(f"word {text[span.start:span.end]!r} is not preceded by a space")
        out += [text[: span.start - 1], text[: span.end]]
    return out


def _word_index(full: list[int], before: list[int], through: list[int]) -> int | None:
    """Index (without special prefix) of the single token that spells ' word', else None."""
    if len(through) != len(before) + 1 or through[: len(before)] != before or full[: len(through)] != through:
        return None
    return len(before)


def _continuation(full: list[int], whole: list[int]) -> list[int] | None:
    return whole[len(full):] if whole[: len(full)] == full else None


def _analyse(encoder: TokenEncoder, examples: Sequence[Example]):
    """For every example: (rendered, full ids, word indices, continuation ids or None)."""
    rendered = [render(ex) for ex in examples]
    queries: list[str] = []
    for ex, r in zip(examples, rendered):
        spans = [*r.object_spans, *r.label_spans, r.query_label_span]
        queries.append(r.prompt)
        queries += _word_queries(r.prompt, spans)
        queries.append(r.prompt + " " + ex.objects[ex.query_index])
    ids = encoder.encode(queries)
    out, k = [], 0
    for ex, r in zip(examples, rendered):
        n_words = 2 * ex.n_boxes + 1  # objects, labels, query label
        full = ids[k]
        spans = [*r.object_spans, *r.label_spans, r.query_label_span]
        words = [_word_index(full, ids[k + 1 + 2 * w], ids[k + 2 + 2 * w]) for w in range(n_words)]
        words = [w if w is not None and encoder.spells(full[w], r.prompt[sp.start:sp.end]) else None
                 for w, sp in zip(words, spans)]
        cont = _continuation(full, ids[k + 1 + 2 * n_words])
        if cont is not None and not (len(cont) == 1 and encoder.spells(cont[0], ex.objects[ex.query_index])):
            cont = None
        out.append((r, full, words, cont))
        k += 2 + 2 * n_words
    return out


#: Per tokenizer (held weakly), the layouts already found: a scorecard's stages lay out the same prompts again
#: (accuracy's are faithfulness' and CMAP's, DCM's are the semantics check's), and finding one tokenizes the
#: prompt once per word (measured on the quick preset: 5,101 layouts of 1,326 distinct prompts, 4.4 s).
#: A ``Layout`` is frozen, so a shared one cannot be changed under another stage.
_LAYOUTS: "weakref.WeakKeyDictionary[Any, dict[tuple[int, Example], Layout]]" = weakref.WeakKeyDictionary()


def layouts(examples: Sequence[Example], tokenizer) -> list[Layout]:
    """The Layout of every example; a clear error if any object or label is not one token."""
    try:
        # the vocabulary size in the key: a token added to the tokenizer later changes its layouts
        memo = _LAYOUTS.setdefault(tokenizer, {})
        size = len(tokenizer)
    except TypeError:  # an object that cannot be weakly referenced or has no length: no memo
        memo, size = {}, 0
    missing = list(dict.fromkeys(ex for ex in examples if (size, ex) not in memo))
    for ex, lay in zip(missing, _layouts(missing, tokenizer) if missing else ()):
        memo[(size, ex)] = lay
    return [memo[(size, ex)] for ex in examples]


def _layouts(examples: Sequence[Example], tokenizer) -> list[Layout]:
    encoder = TokenEncoder(tokenizer)
    n_prefix = len(encoder.prefix_ids)
    result = []
    for ex, (r, full, words, cont) in zip(examples, _analyse(encoder, examples)):
        n = ex.n_boxes
        names = [*ex.objects, *ex.labels, ex.query_label]
        bad = sorted({names[i] for i, w in enumerate(words) if w is None})
        if bad:
            raise EtbenchError(
                f"not single tokens with a leading space for this tokenizer: {', '.join(bad)} "
                f"(in {r.prompt!r}); filter them with etbench.task.layout.check_vocabulary"
            )
        has_answer = ex.query_label == ex.labels[ex.query_index]
        if has_answer and (cont is None or len(cont) != 1):
            raise EtbenchError(f"answer ' {ex.answer}' is not one token after {r.prompt[-20:]!r} for this tokenizer")
        pos = [n_prefix + w for w in words]
        prev = pos[n + ex.labels.index(ex.query_label)] if ex.query_label in ex.labels else None
        result.append(
            Layout(
                input_ids=tuple(encoder.prefix_ids + full),
                object_positions=tuple(pos[:n]),
                label_positions=tuple(pos[n : 2 * n]),
                query_label=pos[2 * n],
                prev_query_label=prev,
                last=n_prefix + len(full) - 1,
                target_id=cont[0] if has_answer else None,
            )
        )
    return result


def single_token_continuations(tokenizer, prompts: Sequence[str], continuations: Sequence[str]) -> list[int]:
    """The one token each continuation adds after its prompt (lm-eval's split), else a clear error."""
    encoder = TokenEncoder(tokenizer)
    ids = encoder.encode([*prompts, *(p + c for p, c in zip(prompts, continuations))])
    out = []
    for k, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        cont = _continuation(ids[k], ids[len(prompts) + k])
        if cont is None or len(cont) != 1 or not encoder.spells(cont[0], continuation.strip()):
            raise EtbenchError(f"{continuation!r} is not one token after {prompt[-20:]!r} for this tokenizer")
        out.append(cont[0])
    return out


@dataclass(frozen=True)
class VocabularyReport:
    """Which objects and labels a tokenizer spells as one leading-space token."""

    kept_objects: tuple[str, ...]
    dropped_objects: tuple[str, ...]
    kept_labels: tuple[str, ...]
    dropped_labels: tuple[str, ...]

    def summary(self) -> str:
        parts = [f"{len(self.kept_objects)} of {len(self.kept_objects) + len(self.dropped_objects)} objects usable"]
        if self.dropped_objects:
            parts.append("dropped (not one token): " + ", ".join(self.dropped_objects))
        if self.dropped_labels:
            parts.append("labels dropped: " + ", ".join(self.dropped_labels))
        return "; ".join(parts)

    def require(self, n_boxes: int) -> None:
        """Raise a clear error when too few objects or labels remain for n_boxes boxes."""
        if len(self.kept_objects) < n_boxes or len(self.kept_labels) < n_boxes:
            raise EtbenchError(
                f"this tokenizer spells too few objects/labels as single tokens for {n_boxes} boxes "
                f"({len(self.kept_objects)} objects, {len(self.kept_labels)} labels): {self.summary()}"
            )


def check_vocabulary(tokenizer, objects: Sequence[str] | None = None, labels: Sequence[str] = LABELS) -> VocabularyReport:
    """Probe every object (after 'The', after 'the', and as the answer) and every label in the
    template's own contexts, so the verdict is the one ``layouts`` would reach."""
    objects = tuple(paper_objects() if objects is None else objects)
    encoder = TokenEncoder(tokenizer)
    probes = [Example(objects=(o, o), labels=("A", "B"), query_index=0) for o in objects]
    object_ok = [all(w is not None for w in words[:2]) and cont is not None and len(cont) == 1
                 for _, _, words, cont in _analyse(encoder, probes)]
    filler = next((o for o, ok in zip(objects, object_ok) if ok), objects[0])
    probes = [Example(objects=(filler, filler), labels=(lab, lab), query_index=0) for lab in labels]
    label_ok = [all(w is not None for w in words[2:5]) for _, _, words, _ in _analyse(encoder, probes)]
    return VocabularyReport(
        kept_objects=tuple(o for o, ok in zip(objects, object_ok) if ok),
        dropped_objects=tuple(o for o, ok in zip(objects, object_ok) if not ok),
        kept_labels=tuple(lab for lab, ok in zip(labels, label_ok) if ok),
        dropped_labels=tuple(lab for lab, ok in zip(labels, label_ok) if not ok),
    )


def usable_pool(tokenizer, n_boxes: int) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """(objects, labels) for ``data.generate`` with this tokenizer: objects is None when all 85 are
    single tokens, so the prompts are exactly the canonical stream; a clear error when too few remain."""
    report = check_vocabulary(tokenizer)
    if report.dropped_objects or report.dropped_labels:
        report.require(n_boxes)
        return report.kept_objects, report.kept_labels
    return None, report.kept_labels


@dataclass
class Batch:
    """Padded model inputs; ``offsets[i]`` is added to row i's Layout positions (left padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    offsets: torch.Tensor

    def positions(self, layouts_: Sequence[Layout], position_class: str) -> torch.Tensor:
        return self.offsets + torch.tensor([lay.position(position_class) for lay in layouts_])

    @property
    def position_ids(self) -> torch.Tensor:
        """Rotary/learned position of each token: counted from the first real token, so a
        left-padded row sees the same positions as an unpadded one (models do not infer this)."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)


def pad_batch(layouts_: Sequence[Layout], pad_id: int, padding_side: str = "right") -> Batch:
    """Pad token ids to one length. Positions stay exact on either side: left padding shifts
    every position of a row by its pad count, which ``offsets`` records."""
    if padding_side not in ("left", "right"):
        raise EtbenchError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(lay.length for lay in layouts_)
    ids = torch.full((len(layouts_), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(layouts_), width), dtype=torch.long)
    offsets = torch.zeros(len(layouts_), dtype=torch.long)
    for i, lay in enumerate(layouts_):
        start = width - lay.length if padding_side == "left" else 0
        ids[i, start : start + lay.length] = torch.tensor(lay.input_ids)
        mask[i, start : start + lay.length] = 1
        offsets[i] = start
    return Batch(ids, mask, offsets)


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
