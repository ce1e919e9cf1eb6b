"""Full-model accuracy, the paper's metric (docs/method.md §2): greedy top-1 over the *whole* vocabulary at
the last prompt token must be the answer token (``tokens(prompt + " obj")`` minus the prompt's).

It is the same quantity as lm-eval's ``acc`` on the loglikelihood task ``entity_tracking_<n>boxes``
(``is_greedy`` of a one-token continuation), so the two must agree item by item.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from etbench import models
from etbench.core.errors import EtbenchError
from etbench.core.io import Writer, atomic_write_json, atomic_write_jsonl, claim_outputs, refuse_foreign_files
from etbench.core.progress import track
from etbench.core.stats import Proportion, proportion_ci
from etbench.mech.forward import last_token_logits, length_batches
from etbench.metrics.chance import chance_accuracy
from etbench.task import prompts as data
from etbench.task.layout import Layout, check_vocabulary, layouts, usable_pool
from etbench.task.prompts import Example

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ItemResult:
    index: int
    context_id: int
    n_boxes: int
    query_index: int
    prompt: str
    answer: str
    target_id: int
    predicted_id: int
    target_logprob: float  # log p(answer token | prompt): lm-eval's loglikelihood of the item
    correct: bool


@dataclass
class AccuracyResult:
    """Accuracy of one model on one example set, with a 95% Wilson CI and per-item results."""

    model: str
    n_boxes: int
    seed: int | None
    ci: Proportion
    items: list[ItemResult] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def accuracy(self) -> float:
        return self.ci.value

    def summary(self) -> dict[str, Any]:
        """Everything but the per-item rows (those go to a JSONL side file)."""
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "n_boxes": self.n_boxes,
            "seed": self.seed,
            "n": self.ci.n,
            "correct": self.ci.k,
            "accuracy": self.accuracy,
            "ci95": [self.ci.low, self.ci.high],
            "ci_method": self.ci.method,
        }

    def item_rows(self) -> list[dict[str, Any]]:
        return [asdict(item) for item in self.items]


def predict_last_token(model, lays: Sequence[Layout], batch_size: int = 16, progress: bool = True,
                       description: str = "accuracy") -> tuple[list[int], list[float]]:
    """Greedy next-token id after each prompt, and the log-probability of its target token.
    Prompts are batched by token length, so no row is ever padded: positions and numerics are
    those of a single unpadded forward."""
    if batch_size < 1:
        raise EtbenchError(f"batch size must be at least 1, got {batch_size}")
    batches = length_batches((lay.length for lay in lays), batch_size)
    predicted, target_logprob = [0] * len(lays), [float("nan")] * len(lays)
    for idx in track(batches, description, total=len(batches), enabled=progress):
        logits = last_token_logits(model, torch.tensor([lays[i].input_ids for i in idx]))
        logprobs = logits.log_softmax(-1)
        for row, (i, top) in enumerate(zip(idx, logits.argmax(-1).tolist())):
            predicted[i] = top
            if lays[i].target_id is not None:
                target_logprob[i] = float(logprobs[row, lays[i].target_id])
    return predicted, target_logprob


def evaluate(model, tokenizer, examples: Sequence[Example], batch_size: int = 16, progress: bool = True,
             model_name: str = "", seed: int | None = None) -> AccuracyResult:
    """Accuracy of ``model`` on ``examples`` (all with the same number of boxes)."""
    lays = layouts(examples, tokenizer)
    n_boxes = examples[0].n_boxes
    predicted, logprob = predict_last_token(model, lays, batch_size, progress, f"accuracy {n_boxes} boxes")
    items = [
        ItemResult(i, ex.context_id, ex.n_boxes, ex.query_index, ex.prompt, ex.answer, lay.target_id, p, lp,
                   p == lay.target_id)
        for i, (ex, lay, p, lp) in enumerate(zip(examples, lays, predicted, logprob))
    ]
    ci = proportion_ci(sum(item.correct for item in items), len(items))
    return AccuracyResult(model=model_name, n_boxes=n_boxes, seed=seed, ci=ci, items=items)


@dataclass
class AccuracyRun:
    """``evaluate`` over several box counts for one model, plus what shaped the example sets."""

    model: str
    results: list[AccuracyResult]
    vocabulary_note: str  # which objects the tokenizer could not use ("" when all 85 are usable)

    @property
    def canonical(self) -> bool:
        """True when the items are exactly the lm-eval task's (no object had to be dropped)."""
        return not self.vocabulary_note


def run(model_ref: str, n_boxes: Sequence[int] = (7,), n: int | None = None, seed: int | None = None,
        batch_size: int = 16, dtype: str = "float32", device: str = "cpu", progress: bool = True,
        loaded=None, report=None) -> AccuracyRun:
    """Load a model (unless ``loaded`` is given; ``report(line)`` gets the load's lines, as in ``models.load``)
    and score it on seeded example sets."""
    n = data.CANONICAL_N if n is None else n
    seed = data.CANONICAL_SEED if seed is None else seed
    for nb in n_boxes:  # validate sizes before spending time on a model load
        data.generate(n_boxes=nb, n=1, seed=seed)
    loaded = loaded or models.load(model_ref, dtype=dtype, device=device, report=report)
    pool, labels = usable_pool(loaded.tokenizer, max(n_boxes))
    results = []
    for nb in n_boxes:
        examples = data.generate(n_boxes=nb, n=n, seed=seed, objects=pool, labels=labels)
        results.append(evaluate(loaded.model, loaded.tokenizer, examples, batch_size, progress, model_ref, seed))
    note = "" if pool is None else check_vocabulary(loaded.tokenizer).summary()
    return AccuracyRun(model=model_ref, results=results, vocabulary_note=note)


#: ``etbench accuracy --out DIR`` (and ``write_run``): its files, listed in its manifest there before they are
#: written; a file of one of these names that no run wrote is refused (``check_run_outputs``), never replaced.
ACCURACY_WRITER = Writer("etbench accuracy", ".etbench-accuracy-manifest.json")
ACCURACY_OUTPUTS = ("accuracy_items.jsonl", "accuracy.json")


def check_run_outputs(out_dir) -> None:
    """Raise, before a model loads, when ``out_dir`` holds a file of ``write_run``'s names that it did not write."""
    from pathlib import Path

    refuse_foreign_files(Path(out_dir), dict.fromkeys(ACCURACY_OUTPUTS), ACCURACY_WRITER)


def write_run(run_: AccuracyRun, out_dir) -> list:
    """``accuracy.json`` (summary) and ``accuracy_items.jsonl`` (every item), written atomically; a file of either
    name that an earlier run did not write is refused (``ACCURACY_WRITER``)."""
    from pathlib import Path

    out_dir = Path(out_dir)
    claim_outputs(out_dir, ACCURACY_OUTPUTS, ACCURACY_WRITER)
    summary = {"schema_version": SCHEMA_VERSION, "model": run_.model, "canonical_items": run_.canonical,
               "vocabulary_note": run_.vocabulary_note, "results": [r.summary() for r in run_.results]}
    rows = [row for r in run_.results for row in r.item_rows()]
    return [atomic_write_jsonl(out_dir / "accuracy_items.jsonl", rows), atomic_write_json(out_dir / "accuracy.json", summary)]


def format_run(run_: AccuracyRun) -> str:
    from tabulate import tabulate

    rows = [[r.n_boxes, r.ci.n, f"{r.accuracy:.3f}", f"[{r.ci.low:.3f}, {r.ci.high:.3f}]", f"{chance_accuracy(r.n_boxes):.3f}"]
            for r in run_.results]
    table = tabulate(rows, headers=["boxes", "n", "accuracy", "95% CI", "chance"], tablefmt="github")
    note = f"\nnote: {run_.vocabulary_note}" if run_.vocabulary_note else ""
    return f"model: {run_.model}\n{table}{note}"
