"""Mean ablation: the reference activations and the mean-ablated forward passes every circuit metric
is built from (faithfulness, discovery's minimality pruning, the random baseline, completeness).

* **Mean activations**: the position-wise mean of every head's ``z`` over prompts whose query letter
  is a uniformly random letter (one prompt per fresh context, queried at segment 0, as in the paper's
  500 ablation prompts). Prompts of one tokenizer normally share one length; if they do not, the mean
  at position t is over the prompts that reach t (left-aligned), which equals the paper's mean when
  lengths agree.
* **Circuit accuracy**: every head's z is replaced by the mean at every position, except circuit heads
  at their group's position class (A, B at the last token; C at the query label; D at the query label's
  earlier copy). Positions outside the three classes are meaned for all heads. MLPs and embeddings are
  never touched. Accuracy is the paper's full-vocabulary top-1.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

import torch

from etbench.core.errors import EtbenchError
from etbench.core.progress import track
from etbench.mech.forward import PassCounter, device_of, forward, length_groups
from etbench.mech.heads import HeadMap, head_map
from etbench.mech.interventions import Edit, Site, cache, replace_where
from etbench.mech.interventions import replace as overwrite  # dataclasses.replace is used here too
from etbench.mech.prefix import PatchRunner
from etbench.schema.circuit import POSITION_CLASSES, Circuit
from etbench.task.layout import Layout, layouts, pad_batch, pad_id_of
from etbench.task.prompts import DEFAULT_WORDING, LABELS, Example, paper_objects, sample_context, stream_rng

# ----------------------------------------------------------------------------------------------
# Mean activations


def ablation_examples(n_boxes: int = 7, n: int = 500, seed: int = 0, objects: Sequence[str] | None = None,
                      labels: Sequence[str] = LABELS, wording: str = DEFAULT_WORDING) -> list[Example]:
    """The mean-ablation prompts (docs/method.md §6): one fresh context each, queried at segment 0, with the
    query letter replaced by a uniformly random letter (usually absent from the context). ``wording``: the
    same contexts in another wording (the mean is position-wise, so it must be taken in the wording it ablates)."""
    objects = tuple(paper_objects() if objects is None else objects)
    rng = stream_rng("ablation", seed, n_boxes)
    out = []
    for i in range(n):
        ctx = sample_context(rng, n_boxes, objects, tuple(labels), context_id=i)
        out.append(replace(ctx, query_label=rng.choice(tuple(labels)), wording=wording))
    return out


@dataclass
class MeanActivations:
    """Position-wise mean z of every head: ``z[layer]`` is ``[S, n_heads, d_head]``."""

    z: list[torch.Tensor]
    counts: torch.Tensor  # [S] prompts that reached each position
    n_prompts: int
    n_boxes: int
    seed: int

    @property
    def length(self) -> int:
        return int(self.counts.shape[0])

    def require(self, n: int, n_boxes: int, seed: int, who: str) -> "MeanActivations":
        """This mean, when it is over the ``n`` prompts of ``n_boxes`` boxes under ``seed`` that ``who`` asks for."""
        if (self.n_prompts, self.n_boxes, self.seed) != (n, n_boxes, seed):
            raise EtbenchError(f"{who}: the given mean activations are over {self.n_prompts} prompts of {self.n_boxes} "
                               f"boxes under seed {self.seed}, not {n} of {n_boxes} under seed {seed}")
        return self


@torch.no_grad()
def mean_activations(model, tokenizer, hm: HeadMap | None = None, n_boxes: int = 7, n: int = 500, seed: int = 0,
                     batch_size: int = 16, objects: Sequence[str] | None = None, labels: Sequence[str] = LABELS,
                     counter: PassCounter | None = None, progress: bool = False,
                     wording: str = DEFAULT_WORDING) -> MeanActivations:
    """Mean z over ``ablation_examples`` (right-padded batches; padding never counts)."""
    hm = hm or head_map(model)
    lays = layouts(ablation_examples(n_boxes, n, seed, objects, labels, wording), tokenizer)
    spec = hm.spec
    width = max(lay.length for lay in lays)
    sums = [torch.zeros(width, spec.n_heads, spec.d_head, dtype=torch.float64) for _ in range(spec.n_layers)]
    counts = torch.zeros(width, dtype=torch.float64)
    chunks = [lays[i: i + batch_size] for i in range(0, len(lays), batch_size)]
    for chunk in track(chunks, "mean activations", total=len(chunks), enabled=progress):
        batch = pad_batch(chunk, pad_id_of(tokenizer), "right")
        if counter is not None:
            counter.add(batch.input_ids)
        dev = device_of(model)
        store = cache(model, hm, {"input_ids": batch.input_ids.to(dev), "attention_mask": batch.attention_mask.to(dev)},
                      [Site(layer) for layer in range(spec.n_layers)], logits_to_keep=1)
        mask = batch.attention_mask.to(torch.float64)  # [B, S]
        s = mask.shape[1]
        counts[:s] += mask.sum(0)
        for layer in range(spec.n_layers):
            sums[layer][:s] += torch.einsum("bs,bshd->shd", mask, store[(layer, "z")].cpu().to(torch.float64))
    z = [(total / counts.clamp(min=1)[:, None, None]).to(next(model.parameters()).dtype) for total in sums]
    return MeanActivations(z, counts, n, n_boxes, seed)


# ----------------------------------------------------------------------------------------------
# Mean-ablated forward passes


HeadSets = Mapping[str, set[tuple[int, int]]]  # position class -> {(layer, head)}


def _class_positions(lays: Sequence[Layout], position_class: str) -> list[int | None]:
    return [getattr(lay, position_class) for lay in lays]


def ablation_edits(hm: HeadMap, mean: MeanActivations, lays: Sequence[Layout], *, keep: HeadSets | None = None,
                   ablate: HeadSets | None = None, shift: int = 0) -> list[Edit]:
    """Mean-ablation edits for one batch of equal-length, unpadded prompts.

    ``keep`` (circuit mode): every head is meaned at every position except the listed heads at their
    position class. ``ablate`` (knock-out mode): only the listed heads at their position class are
    meaned. Exactly one of the two must be given. ``shift``: the edits cover positions ``shift..last``
    only, given relative to ``shift`` (a run on a key/value prefix of ``shift`` tokens)."""
    if (keep is None) == (ablate is None):
        raise EtbenchError("ablation_edits: give exactly one of keep= or ablate=")
    spec = hm.spec
    seq = lays[0].length
    if any(lay.length != seq for lay in lays):
        raise EtbenchError("ablation_edits: prompts of one batch must share one length")
    if seq > mean.length:
        raise EtbenchError(f"prompts have {seq} tokens but the mean activations cover only {mean.length} "
                           "(compute them on prompts with as many boxes)")
    listed = keep if keep is not None else ablate
    by_layer: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for pc, heads in listed.items():
        if pc not in POSITION_CLASSES:
            raise EtbenchError(f"unknown position class {pc!r}")
        for layer, head in heads:
            by_layer[layer].append((pc, head))
    positions = {pc: _class_positions(lays, pc) for pc in POSITION_CLASSES}
    edits = []
    layers = range(spec.n_layers) if keep is not None else sorted(by_layer)
    for layer in layers:
        mask = torch.zeros(len(lays), seq - shift, spec.n_heads, dtype=torch.bool)
        for pc, head in by_layer.get(layer, ()):
            for row, pos in enumerate(positions[pc]):
                if pos is None:
                    raise EtbenchError(f"a prompt has no {pc} position (is its query label in the context?)")
                if pos < shift:
                    raise EtbenchError(f"ablation_edits: a {pc} head sits at position {pos}, before the shift {shift}")
                mask[row, pos - shift, head] = True
        keep_mask = mask if keep is not None else ~mask
        edits.append(replace_where(layer, "z", mean.z[layer][shift:seq], keep_mask))
    return edits


def sparse_keep_edits(hm: HeadMap, mean: MeanActivations, lays: Sequence[Layout], keep: HeadSets,
                      fed: torch.Tensor) -> list[Edit]:
    """Circuit-mode edits (``ablation_edits(keep=...)``) for a run over only the positions ``fed``
    (``[B, P]`` per row, ascending; ``PatchRunner.logits_at``): every head meaned at those positions except
    the kept heads at their own position class."""
    spec = hm.spec
    if int(fed.max()) >= mean.length:
        raise EtbenchError(f"prompts have {int(fed.max()) + 1} tokens but the mean activations cover only "
                           f"{mean.length} (compute them on prompts with as many boxes)")
    by_layer: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for pc, heads in keep.items():
        for layer, head in heads:
            by_layer[layer].append((pc, head))
    at = {}
    for pc in {pc for pc, heads in keep.items() if heads}:
        positions = _class_positions(lays, pc)
        if any(pos is None for pos in positions):
            raise EtbenchError(f"a prompt has no {pc} position (is its query label in the context?)")
        at[pc] = fed == torch.tensor(positions)[:, None]  # [B, P]: where the class sits among the fed tokens
    edits = []
    for layer in range(spec.n_layers):
        mask = torch.zeros(*fed.shape, spec.n_heads, dtype=torch.bool)
        for pc, head in by_layer.get(layer, ()):
            mask[:, :, head] |= at[pc]
        edits.append(replace_where(layer, "z", mean.z[layer][fed], mask))
    return edits


def knockout_edits(mean: MeanActivations, heads: Iterable[tuple[int, int]], length: int) -> list[Edit]:
    """Mean-ablate ``heads`` ((layer, head) pairs) at *every* position of prompts of ``length`` tokens,
    whatever the prompt: one edit per layer, usable under ``interventions.applied`` for any batch of that
    length, with gradients flowing through every other head (training around a knocked-out group)."""
    if length > mean.length:
        raise EtbenchError(f"prompts have {length} tokens but the mean activations cover only {mean.length}")
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        by_layer[layer].append(head)
    return [overwrite(layer, "z", mean.z[layer][:length, sorted(hs)], heads=sorted(hs))
            for layer, hs in sorted(by_layer.items())]


def _heads_key(sets: HeadSets | None) -> frozenset:
    return frozenset((pc, layer, head) for pc, heads in (sets or {}).items() for layer, head in heads)


class AblationRunner:
    """Mean-ablated forward passes over one prompt set, each computing only the tokens it can change.

    Circuit mode (``keep``): before a row's earliest kept position every head is meaned whatever the
    circuit, so those tokens come from one stored all-meaned run (``prefix.PatchRunner``); random
    circuits, curve points and completeness then run only the rest of the prompt. Knock-out mode
    (``ablate``) reuses the clean run the same way. Results are memoised per head set, so the model's
    own flags or a circuit evaluated twice cost nothing the second time. ``reuse_prefix=False`` runs
    whole prompts (one forward per batch, no base runs); both paths agree to float precision."""

    def __init__(self, model, hm: HeadMap, lays: Sequence[Layout], mean: MeanActivations | None,
                 batch_size: int = 16, counter: PassCounter | None = None, reuse_prefix: bool = True,
                 n_boxes: int | None = None, seed: int | None = None, max_splits: int = 4,
                 sparse: bool = True) -> None:
        self.model, self.hm, self.lays, self.mean = model, hm, list(lays), mean
        self.max_splits = max_splits
        self.n_boxes, self.seed = n_boxes, seed  # what the prompts were generated from, when known
        self.batch_size, self.counter, self.reuse_prefix = batch_size, counter, reuse_prefix
        self._groups = length_groups(lay.length for lay in self.lays)
        self._runners: dict[tuple[int, str], Any] = {}
        self._memo: dict[tuple[str, frozenset], list[bool]] = {}
        # circuit runs over the kept positions only (``_sparse``): None until checked against the prefix path
        # on the first circuit run, then whether this model's runs agree (``SPARSE_TOLERANCE``)
        self.sparse: bool | None = None if sparse else False
        self.sparse_check: dict[str, float] = {}

    def _runner(self, gi: int, base: str):
        if (gi, base) not in self._runners:
            sub = [self.lays[i] for i in self._groups[gi]]
            meaned = None if base == "clean" else (
                lambda rows: ablation_edits(self.hm, self.mean, [sub[r] for r in rows.tolist()], keep={}))
            self._runners[(gi, base)] = PatchRunner(
                self.model, torch.tensor([lay.input_ids for lay in sub]), self.batch_size, base_edits=meaned,
                counter=self.counter, description=f"{base} runs")
        return self._runners[(gi, base)]

    @torch.no_grad()
    def correct(self, keep: HeadSets | None = None, ablate: HeadSets | None = None) -> list[bool]:
        """Per prompt: is the top-1 next token the answer, under the given mean ablation (none when both
        ``keep`` and ``ablate`` are None: the full model)."""
        mode = "keep" if keep is not None else "ablate" if ablate is not None else "none"
        key = (mode, _heads_key(keep if keep is not None else ablate))
        if key not in self._memo:
            if mode != "none" and self.mean is None:
                raise EtbenchError("mean ablation needs mean activations")
            self._memo[key] = self._run(keep, ablate) if self.reuse_prefix else self._run_whole(keep, ablate)
        return list(self._memo[key])

    def _run_whole(self, keep, ablate) -> list[bool]:
        correct = [False] * len(self.lays)
        for idx in self._groups:
            for s in range(0, len(idx), self.batch_size):
                chunk = [self.lays[i] for i in idx[s: s + self.batch_size]]
                edits = [] if keep is None and ablate is None else ablation_edits(
                    self.hm, self.mean, chunk, keep=keep, ablate=ablate)
                out = forward(self.model, torch.tensor([lay.input_ids for lay in chunk]), self.hm, edits, self.counter)
                for lay, i, t in zip(chunk, idx[s: s + self.batch_size], out.logits[:, -1].argmax(-1).tolist()):
                    correct[i] = t == lay.target_id
        return correct

    def _run(self, keep, ablate) -> list[bool]:
        listed = keep if keep is not None else ablate
        classes = [pc for pc, heads in (listed or {}).items() if heads]
        correct = [False] * len(self.lays)
        for gi, idx in enumerate(self._groups):
            sub = [self.lays[i] for i in idx]
            runner = self._runner(gi, "meaned" if keep is not None else "clean")
            if not classes:  # the base run itself: everything meaned, or the clean model
                pred = runner.base_argmax.tolist()
            else:
                # a row's edits can change nothing before its earliest listed position
                starts = torch.tensor([min(getattr(lay, pc) for pc in classes) for lay in sub])
                pred = []
                # a chunk splits into up to max_splits runs by start, so chunks of batch_size x
                # max_splits rows keep runs near batch_size (measured on tiny-base: 16 x 4 rows took
                # 16-22% less time, in two runs, than 16 rows in up to 8 runs)
                chunk = self.batch_size * self.max_splits
                for s in range(0, len(sub), chunk):
                    rows = torch.arange(s, min(s + chunk, len(sub)))

                    def edits(part: torch.Tensor, shift: int, rows=rows):
                        part_lays = [sub[r] for r in rows[part].tolist()]
                        return ablation_edits(self.hm, self.mean, part_lays, keep=keep, ablate=ablate, shift=shift)

                    kv = runner.kv(rows)
                    fed = self._fed(sub, rows, classes) if keep is not None and kv is not None else None
                    if fed is not None and self.sparse is None:
                        self._check_sparse(runner, rows, kv, fed, keep, sub, starts, edits)
                    if fed is not None and self.sparse:
                        part = [sub[r] for r in rows.tolist()]
                        logits = runner.logits_at(rows, kv, fed, sparse_keep_edits(self.hm, self.mean, part, keep, fed))
                    else:
                        logits = runner.logits(rows, kv, starts[rows], edits, self.max_splits)
                    pred += logits.argmax(-1).tolist()
            for i, lay, t in zip(idx, sub, pred):
                correct[i] = t == lay.target_id
        return correct


    @staticmethod
    def _fed(sub: Sequence[Layout], rows: torch.Tensor, classes: Sequence[str]) -> torch.Tensor | None:
        """Per row, the positions a circuit run must compute: its kept classes' and the last ``[B, P]``
        (None when rows would feed different counts, which the paper's layouts never do)."""
        fed = [sorted({getattr(sub[r], pc) for pc in classes} | {sub[r].length - 1}) for r in rows.tolist()]
        if len({len(f) for f in fed}) != 1 or any(p is None for f in fed for p in f):
            return None
        return torch.tensor(fed)

    def _check_sparse(self, runner, rows, kv, fed, keep, sub, starts, edits) -> None:
        """Compare the first sparse circuit run with the prefix path on the same rows: a model whose positions
        interact outside attention, or whose attention ignores the custom mask, keeps the prefix path."""
        part = [sub[r] for r in rows.tolist()]
        try:
            sparse = runner.logits_at(rows, kv, fed, sparse_keep_edits(self.hm, self.mean, part, keep, fed))
        except (TypeError, ValueError, RuntimeError) as err:  # e.g. a model that rejects a 4D mask
            self.sparse, self.sparse_check = False, {"error": str(err).splitlines()[0][:200]}
            return
        prefix = runner.logits(rows, kv, starts[rows], edits, self.max_splits)
        diff = float((sparse - prefix).abs().max())
        tolerance = SPARSE_TOLERANCE.get(str(next(self.model.parameters()).dtype), 0.0)
        agree = diff <= tolerance and torch.equal(sparse.argmax(-1), prefix.argmax(-1))
        self.sparse, self.sparse_check = agree, {"max_abs_logit_diff": diff, "tolerance": tolerance}


#: The largest logit difference between a sparse circuit run and the prefix path that still counts as the
#: same computation, by the model's dtype (measured on SmolLM2-135M in fp32: 3.0e-5 at most, tiny-base's
#: 109-node circuit at n 64, 33x under the fp32 tolerance; a model whose
#: runs differ more, or whose argmax differs on any row checked, keeps the prefix path).
SPARSE_TOLERANCE = {"torch.float32": 1e-3, "torch.float64": 1e-6, "torch.bfloat16": 0.25, "torch.float16": 0.05}


def ablated_correct(model, hm: HeadMap, lays: Sequence[Layout], mean: MeanActivations | None, *,
                    keep: HeadSets | None = None, ablate: HeadSets | None = None, batch_size: int = 16,
                    counter: PassCounter | None = None) -> list[bool]:
    """Per prompt: is the top-1 next token the answer, under the given mean ablation (none when both
    ``keep`` and ``ablate`` are None: the full model). One pass over whole prompts; for many ablations
    of the same prompts use an ``AblationRunner``."""
    return AblationRunner(model, hm, lays, mean, batch_size, counter, reuse_prefix=False).correct(keep, ablate)


def circuit_correct(model, hm, lays, mean, circuit: Circuit, batch_size: int = 16,
                    counter: PassCounter | None = None) -> list[bool]:
    """Per-prompt correctness of the circuit with everything else mean-ablated."""
    circuit.check_model(hm.spec)
    return ablated_correct(model, hm, lays, mean, keep=circuit.kept(), batch_size=batch_size, counter=counter)
