"""Accuracy across wordings of the task (docs/method.md §14).

Circuits found by current methods can change under small meaning-preserving changes of the prompts, and a
fine-tune can gain on one wording only. ``accuracy_by_wording`` scores one model on the same contexts and
queries in each wording of ``task.prompts.WORDINGS`` (the paper's template and two held out from every
fine-tune), each with its Wilson CI, and compares every wording with the first on the same items: the
paired accuracy difference (bootstrap CI) and the exact McNemar p-value. ``circuit_by_wording`` asks whether
a circuit carries over: its faithfulness under mean ablation (§6), the mean taken in each wording.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from etbench.core.errors import EtbenchError
from etbench.core.io import finite, jsonable
from etbench.core.stats import Estimate, format_estimate, format_estimate_of, format_p, mcnemar, to_estimate
from etbench.metrics.accuracy import evaluate
from etbench.metrics.faithfulness import evaluate_circuit, evaluation_runner
from etbench.models.load import as_loaded
from etbench.schema.circuit import Circuit
from etbench.task import prompts
from etbench.task.layout import usable_pool

SCHEMA_VERSION = 1
FORMAT = "etbench-wording-accuracy"


@dataclass
class WordingRow:
    wording: str
    example: str  # the first prompt, to show what the wording reads like
    accuracy: Estimate
    correct: list[bool]  # per item, in item order (the same contexts and queries in every wording)
    vs_reference: Estimate | None  # accuracy here - on the reference wording, paired; None for the reference
    mcnemar_p: float | None


@dataclass
class WordingAccuracy:
    model: str
    n_boxes: int
    n: int
    seed: int
    reference: str
    rows: list[WordingRow]

    def row(self, wording: str) -> WordingRow:
        for r in self.rows:
            if r.wording == wording:
                return r
        raise KeyError(wording)

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"format": FORMAT, "schema_version": SCHEMA_VERSION, "model": self.model,
                         "n_boxes": self.n_boxes, "n": self.n, "seed": self.seed, "reference": self.reference,
                         "rows": [asdict(r) for r in self.rows]})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WordingAccuracy:
        if data.get("format") != FORMAT or data.get("schema_version") != SCHEMA_VERSION:
            raise EtbenchError(f"not an {FORMAT} file of schema version {SCHEMA_VERSION}")
        try:
            rows = [WordingRow(r["wording"], r["example"], Estimate(**r["accuracy"]), [bool(x) for x in r["correct"]],
                               None if r["vs_reference"] is None else Estimate(**r["vs_reference"]), r["mcnemar_p"])
                    for r in data["rows"]]
            return cls(str(data["model"]), int(data["n_boxes"]), int(data["n"]), int(data["seed"]),
                       str(data["reference"]), rows)
        except (KeyError, TypeError) as err:
            raise EtbenchError(f"malformed {FORMAT} file: {err}") from None


def accuracy_by_wording(model, tokenizer=None, *, wordings: Sequence[str] | None = None, n_boxes: int = 7,
                        n: int = 100, seed: int = 0, batch_size: int = 16, model_name: str = "",
                        progress: bool = False) -> WordingAccuracy:
    """Accuracy of ``model`` (a loaded model + ``tokenizer``, a ``LoadedModel`` or a registry ref) on the first
    ``n`` items of seed ``seed`` in each of ``wordings`` (default: every wording, the paper's first)."""
    wordings = _checked_wordings(wordings)
    model, tokenizer, model_name = as_loaded(model, tokenizer, model_name)
    pool, labels = usable_pool(tokenizer, n_boxes)
    rows: list[WordingRow] = []
    reference: list[bool] = []
    for w in wordings:
        examples = prompts.generate(n_boxes=n_boxes, n=n, seed=seed, objects=pool, labels=labels, wording=w)
        res = evaluate(model, tokenizer, examples, batch_size, progress, model_name, seed)
        correct = [item.correct for item in res.items]
        vs, p = None, None
        if rows:
            test = mcnemar(reference, correct, seed=seed)
            vs, p = to_estimate(test.difference), test.p_value
        else:
            reference = correct
        rows.append(WordingRow(w, examples[0].prompt, to_estimate(res.ci), correct, vs, p))
    return WordingAccuracy(model_name, n_boxes, n, seed, wordings[0], rows)


def format_wording_accuracy(res: WordingAccuracy) -> str:
    from tabulate import tabulate

    rows = [[r.wording, format_estimate_of(r.accuracy), format_estimate_of(r.vs_reference, signed=True),
             format_p(r.mcnemar_p)] for r in res.rows]
    return (f"model: {res.model}   {res.n_boxes} boxes, {res.n} items (seed {res.seed})\n"
            + tabulate(rows, headers=["wording", "accuracy", f"vs {res.reference} (paired)", "McNemar p"],
                       tablefmt="github", disable_numparse=True))


@dataclass
class CircuitWordingRow:
    wording: str
    model_acc: Estimate
    circuit_acc: Estimate
    faithfulness: Estimate  # circuit / model accuracy, paired percentile bootstrap over items
    # per item, in item order: the rows the three estimates re-derive from (metrics.robustness keeps them)
    model_correct: list[bool] = field(default_factory=list)
    circuit_correct: list[bool] = field(default_factory=list)


def _checked_wordings(wordings: Sequence[str] | None) -> list[str]:
    wordings = list(prompts.WORDINGS) if wordings is None else list(dict.fromkeys(wordings))
    if not wordings:
        raise EtbenchError("a measure by wording needs at least one wording")
    for w in wordings:
        prompts.check_wording(w)
    return wordings


def circuit_by_wording(model, circuit: Circuit, tokenizer=None, *, wordings: Sequence[str] | None = None,
                       n_boxes: int = 7, n: int = 100, mean_n: int = 100, seed: int = 0, batch_size: int = 16,
                       model_name: str = "", progress: bool = False) -> list[CircuitWordingRow]:
    """Faithfulness of ``circuit`` on ``model`` in each wording: the first ``n`` items of seed ``seed`` and a
    mean over ``mean_n`` ablation prompts, both in that wording (the mean is position-wise)."""
    wordings = _checked_wordings(wordings)
    model, tokenizer, model_name = as_loaded(model, tokenizer, model_name)
    rows = []
    for w in wordings:
        runner = evaluation_runner(model, tokenizer, n_boxes, n, seed, mean_n, batch_size, progress=progress,
                                   wording=w)
        ev = evaluate_circuit(model, circuit, tokenizer, n_boxes=n_boxes, n=n, seed=seed, mean_n=mean_n,
                              batch_size=batch_size, random_draws=0, completeness_draws=0, curve=False,
                              model_name=model_name, runner=runner)
        low, high = ev.faithfulness_ci
        value = finite(ev.faithfulness)
        faith = Estimate(value, finite(low), finite(high), n, "paired-bootstrap-percentile (ratio of sums)",
                         note="" if value is not None else "undefined: the model answers no item")
        rows.append(CircuitWordingRow(w, to_estimate(ev.model_acc), to_estimate(ev.circuit_acc), faith,
                                      list(ev.model_correct), list(ev.circuit_correct)))
    return rows


def format_circuit_by_wording(rows: Sequence[CircuitWordingRow]) -> str:
    from tabulate import tabulate

    return tabulate([[r.wording, format_estimate_of(r.model_acc), format_estimate_of(r.circuit_acc),
                      format_estimate(r.faithfulness.value, r.faithfulness.low, r.faithfulness.high)] for r in rows],
                    headers=["wording", "model", "circuit", "faithfulness"], tablefmt="github", disable_numparse=True)
