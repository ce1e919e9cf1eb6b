"""Train the embedded model families: a base and its fine-tunes, the paper's Goat story in miniature.

A *family* is a pretrained model from PyPI plus stages, each a LoRA trained on top of its parent stage
(or of the pretrained model). Two families share this code:

* ``tiny`` (SmolLM2-135M-Instruct, a Llama): ``tiny-base`` = SmolLM2 + a LoRA trained for a few steps on
  the paper's template, so that it tracks entities clearly above chance but far from perfectly (merged at
  load); ``tiny-ft`` = tiny-base + a second LoRA trained *only* on another wording of the task that keeps
  the object-before-label structure (``a key sits inside crate Q; … . Crate Q holds a`` → `` key``) and
  never on the paper's template (a non-merged PEFT adapter). ``assets/tiny/MODEL_CARD.md``.
* ``gemma`` (Gemma-3-270M base, a second architecture: one KV head, q/k-norm, sliding-window layers, a
  262k vocabulary): ``gemma-base`` the same way, and two fine-tunes of it, ``gemma-ft`` (crate wording)
  and ``gemma-goat`` (Goat-style generated arithmetic, ``etbench.training.corpora``; loss on the written-out
  answer), and two transfer attempts, ``gemma-code`` and ``gemma-kv`` (the tiny zoo's tiny-code and tiny-kv
  data: variable lookup in REPL sessions, key-value recall in lists). ``assets/gemma/MODEL_CARD.md``.

Whether a fine-tune improves entity tracking on the paper's template is measured, not forced.

    python -m etbench.training.tiny [--family gemma]  # retrain the family's adapters into assets/<family>/
    python -m etbench.training.tiny --card            # + evaluate the family's models on the canonical
                                                      #   sets, write assets/<family>/card_results.json
    python -m etbench.training.tiny --out DIR --no-monitor [--stages NAME,... | --base-only | --ft-only]
                                  # retrain elsewhere and print max |retrained - shipped| per adapter; a stage
                                  # whose parent is not retrained in the same run trains on the shipped parent
    python -m etbench.training.tiny --card-only --models tiny-ft --boxes 7 --card-json FILE
                                  # evaluate only some models / box counts (resumable)

Training data come from named random streams (``stream_rng("train-tiny", ...)``; the arithmetic from
``stream_rng("train-zoo", "arithmetic", seed)``, the same problems as the tiny zoo's) that never meet the
canonical evaluation set (``generate(n_boxes, 500, seed=0)``, stream ``data:0:n``). Everything is seeded;
CPU fp32 with 2 threads reproduces the shipped adapters.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from etbench import models
from etbench.core.errors import EtbenchError
from etbench.core.io import ASSETS_DIR, atomic_write_text
from etbench.metrics.accuracy import evaluate
from etbench.task.layout import layouts
from etbench.task.prompts import LABELS, Example, paper_objects, sample_context, stream_rng
from etbench.training.loop import (
    BATCH,
    LORA,
    THREADS,
    AnswerRow,
    OneLineParser,
    add_lora,
    answer_token_loss,
    box_counts,
    card_results,
    check_out,
    compare_adapters,
    deterministic,
    environment,
    fresh_examples,
    last_logits,
    masked_token_loss,
    monitor_every,
    pad_token_id,
    prompt_answer_rows,
    run_steps,
    save_adapter,
    save_results,
    stack_rows,
    thread_count,
)
from etbench.training.zoo import (
    OWN_TASK_DATA,
    ZooRow,
    arithmetic_rows,
    objective_loss,
    own_task_results,
    paired_vs_base,
)

#: Training wordings: answer-token loss on an entity-tracking prompt, the language-model loss on the
#: written-out answer of a generated arithmetic problem, or answer-token loss on the zoo's binding tasks that are
#: not entity tracking (key-value recall in lists, variable lookup in REPL sessions: the transfer attempts).
WORDINGS = ("paper", "crate", "arithmetic", "kv", "code")


@dataclass(frozen=True)
class Stage:
    name: str  # registry alias and adapter directory under the output dir
    wording: str  # one of WORDINGS
    steps: int
    lr: float
    seed: int
    n_boxes: tuple[int, ...] = (7,)  # box counts, cycled over batches (one box count per batch)
    parent: str | None = None  # the stage this LoRA trains on (merged); None = the family's pretrained model


@dataclass(frozen=True)
class Family:
    name: str  # --family value and the asset directory
    base_ref: str  # registry alias of the pretrained model
    stages: tuple[Stage, ...]  # in training order: a parent before its children
    adapter_dtype: torch.dtype = torch.float32  # as shipped (fp16 halves the files)
    test_subset: int = 140  # canonical 7-box items a test re-evaluates against the card

    @property
    def asset_dir(self) -> Path:
        return ASSETS_DIR / self.name

    @property
    def card_models(self) -> tuple[str, ...]:
        return (self.base_ref, *(stage.name for stage in self.stages))

    def parent_ref(self, stage: Stage) -> str:
        return stage.parent or self.base_ref


# A LoRA recipe verified earlier used 10 base steps at lr 3e-4 (7-box acc 0.44 there); with this data stream 10
# steps gave 0.31 on the held-out monitor and 16 gave 0.44, so the base trains 18 steps (0.52).
# ft: lr 1e-3, seed 1, crate wording only; 20 steps (recipe: 0.84 after 20 steps, 0.85 after 30).
TINY = Family("tiny", "smollm2-135m-instruct", (
    Stage("tiny-base", "paper", steps=18, lr=3e-4, seed=0),
    Stage("tiny-ft", "crate", steps=20, lr=1e-3, seed=1, parent="tiny-base"),
))
# The same recipe on Gemma-3-270M. gemma-base's steps were set from a 24-step probe (2026-12-01, --monitor-every 2,
# held-out 140-prompt monitor): gemma3-270m alone 0.129; steps 2-12: 0.243, 0.321, 0.400, 0.529, 0.443, 0.629. It
# trains 8 steps (0.529, near tiny-base's 0.52 on the same monitor); the fine-tunes keep the tiny family's steps.
# About 21 s per step at 2 threads beside a 1-thread job on 2 cores.
GEMMA = Family("gemma", "gemma3-270m", (
    Stage("gemma-base", "paper", steps=8, lr=3e-4, seed=0),
    Stage("gemma-ft", "crate", steps=20, lr=1e-3, seed=1, parent="gemma-base"),
    Stage("gemma-goat", "arithmetic", steps=30, lr=1e-3, seed=0, parent="gemma-base"),
    # issue 28's transfer attempts on the second family: tiny-code's and tiny-kv's recipe and data, unchanged
    Stage("gemma-code", "code", steps=20, lr=1e-3, seed=0, parent="gemma-base"),
    Stage("gemma-kv", "kv", steps=20, lr=1e-3, seed=0, parent="gemma-base"),
), adapter_dtype=torch.float16, test_subset=100)
FAMILIES = {family.name: family for family in (TINY, GEMMA)}
# the tiny family's names, kept for callers of the single-family version
BASE_REF, ASSET_DIR, STAGES = TINY.base_ref, TINY.asset_dir, TINY.stages
MONITOR_N = 140  # held-out paper-template prompts (7 boxes) for the training log


# ---------------------------------------------------------------------------------------- data


def crate_prompt(example: Example) -> tuple[str, str]:
    """The fine-tuning wording (training data only, not benchmark data): objects still come
    before their labels, so plain copying of the token after the label does not solve it."""
    body = "; ".join(f"a {o} sits inside crate {lab}" for o, lab in zip(example.objects, example.labels))
    body = body[0].upper() + body[1:]
    return f"{body}. Crate {example.query_label} holds a", " " + example.answer


def zoo_row(stage: Stage) -> ZooRow:
    """The tiny zoo's row with this stage's data and recipe: the same data stream, so that the same seed gives
    the same problems / prompts as the tiny row (tiny-goat, tiny-code, tiny-kv)."""
    return ZooRow(stage.name, stage.wording, "lora", stage.steps, stage.lr, stage.seed)


def training_examples(stage: Stage, n: int) -> list[Example]:
    """n fresh contexts with a uniformly drawn queried box, from the stage's own stream."""
    return fresh_examples(stream_rng("train-tiny", stage.name, stage.seed), n, stage.n_boxes)


def monitor_examples(n: int = MONITOR_N, n_boxes: int = 7) -> list[Example]:
    """Held-out paper-template prompts for the training log (not the canonical set)."""
    rng = stream_rng("train-tiny", "monitor", n_boxes)
    pool = paper_objects()
    return [sample_context(rng, n_boxes, pool, LABELS, i).with_query(rng.randrange(n_boxes)) for i in range(n)]


def encode(tokenizer, examples: Sequence[Example], wording: str) -> list[AnswerRow]:
    """(prompt token ids, answer token id) per example."""
    if wording == "paper":
        return [(list(lay.input_ids), int(lay.target_id)) for lay in layouts(examples, tokenizer)]
    return prompt_answer_rows(tokenizer, [crate_prompt(ex) for ex in examples])


@torch.no_grad()
def wording_accuracy(model, tokenizer, examples: Sequence[Example], wording: str, batch_size: int = 35) -> float:
    """Greedy top-1 accuracy on a training wording (right-padded batches; for the log only)."""
    was_training = model.training
    model.eval()
    rows, correct = encode(tokenizer, examples, wording), 0
    for i in range(0, len(rows), batch_size):
        input_ids, targets = stack_rows(rows[i : i + batch_size])
        correct += int((last_logits(model, input_ids).argmax(-1) == targets).sum())
    model.train(was_training)
    return correct / len(rows)


def monitor_accuracy(model, tokenizer, examples: Sequence[Example]) -> float:
    """etbench's accuracy (full-vocabulary greedy top-1 at the last token) for the training log."""
    was_training = model.training
    model.eval()
    acc = evaluate(model, tokenizer, examples, batch_size=35, progress=False).accuracy
    model.train(was_training)
    return acc


# ------------------------------------------------------------------------------------ training


def train_stage(model, tokenizer, stage: Stage, monitor: Sequence[Example] = (), monitor_every: int = 0, log=print,
                lora: dict = LORA):
    """Wrap ``model`` in a fresh LoRA (``lora``: peft LoraConfig settings) and train it on the stage's data;
    returns the PeftModel."""
    before = None
    if monitor and stage.wording == "crate":
        before = wording_accuracy(model, tokenizer, monitor, stage.wording)
        log(f"[{stage.name}] before training, accuracy in its training wording: {before:.3f}")
    peft_model = add_lora(model, stage.seed, lora)
    if stage.wording == "arithmetic":
        # the tiny zoo's arithmetic data (same stream: the same problems as tiny-goat for the same seed)
        rows: list = arithmetic_rows(tokenizer, zoo_row(stage))
        pad_id = pad_token_id(tokenizer)

        def loss_fn(m, batch):
            return masked_token_loss(m, batch, pad_id)
    elif stage.wording in OWN_TASK_DATA:  # the zoo's rows and loss (prompts of several lengths, padded)
        rows, loss_fn = objective_loss(zoo_row(stage), tokenizer, {})
    else:
        rows, loss_fn = encode(tokenizer, training_examples(stage, stage.steps * BATCH), stage.wording), answer_token_loss

    def after_step(step: int, entry: dict) -> None:
        if monitor and monitor_every and step % monitor_every == 0 and step < stage.steps:
            entry["monitor_accuracy"] = monitor_accuracy(peft_model, tokenizer, monitor)
            log(f"[{stage.name}] step {step}: held-out accuracy {entry['monitor_accuracy']:.3f}")

    batches = [rows[step * BATCH : (step + 1) * BATCH] for step in range(stage.steps)]
    history, train_seconds = run_steps(peft_model, batches, loss_fn, stage.lr, stage.name, log, after_step)
    info = {"history": history, "train_seconds": round(train_seconds, 1)}
    if before is not None:
        info["own_wording_accuracy_before"] = before
    if monitor:
        info["monitor_accuracy"] = monitor_accuracy(peft_model, tokenizer, monitor)
        log(f"[{stage.name}] held-out 7-box paper-template accuracy {info['monitor_accuracy']:.3f} (n={len(monitor)})")
        if stage.wording == "crate":
            info["own_wording_accuracy"] = wording_accuracy(peft_model, tokenizer, monitor, stage.wording)
            log(f"[{stage.name}] same prompts in its training wording: {info['own_wording_accuracy']:.3f}")
    return peft_model, info


def round_adapter(peft_model, dtype: torch.dtype) -> None:
    """Round the LoRA weights to the shipped dtype in place, so that a child stage trained in this
    process sees the parent exactly as loading the shipped (e.g. fp16) adapter gives it."""
    if dtype != torch.float32:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(param.to(dtype).float())


def train(family: Family = TINY, out_dir: Path | None = None, monitor_every: int = 0, monitor: bool = True,
          stages: Sequence[str] | None = None, log=print) -> dict:
    """Train the family's stages (all, or the named ones) in order into ``out_dir/<stage>`` (PEFT
    adapter dirs). A stage trains on its parent as trained in this run, or else on the *shipped* parent
    as ``etbench.models.load`` returns it (quicker reproducibility checks of one stage)."""
    out_dir = family.asset_dir if out_dir is None else out_dir
    todo = [stage for stage in family.stages if stages is None or stage.name in stages]
    unknown = set(stages or ()) - {stage.name for stage in family.stages}
    if unknown:
        raise ValueError(f"unknown stages for family {family.name}: {', '.join(sorted(unknown))}")
    deterministic()
    t0 = time.perf_counter()
    held_out = monitor_examples() if monitor else []
    summary: dict = {"family": family.name}
    model = tokenizer = current = None  # current: the name of the (merged) model in memory
    for stage in todo:
        parent = family.parent_ref(stage)
        if current != parent:
            t1 = time.perf_counter()
            loaded = models.load(parent)
            model, tokenizer, current = loaded.model, loaded.tokenizer, parent
            log(f"loaded {parent} in {time.perf_counter() - t1:.1f} s")
            if held_out and parent == family.base_ref:
                summary["base_monitor_accuracy"] = monitor_accuracy(model, tokenizer, held_out)
                log(f"[{parent}] held-out 7-box paper-template accuracy {summary['base_monitor_accuracy']:.3f}")
        peft_model, info = train_stage(model, tokenizer, stage, held_out, monitor_every, log)
        round_adapter(peft_model, family.adapter_dtype)
        save_adapter(peft_model, out_dir / stage.name, parent, family.adapter_dtype)
        summary[stage.name] = {**info, "stage": {**stage.__dict__, "adapter_dtype": str(family.adapter_dtype)}}
        if any(later.parent == stage.name for later in todo):
            model, current = peft_model.merge_and_unload(), stage.name  # its children train on it, merged
        else:
            model = peft_model.unload()  # the parent again, its weights untouched (the LoRA was never merged)
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    summary["environment"] = environment()
    log(f"done in {summary['total_seconds']} s")
    return summary


# ---------------------------------------------------------------------------------- model card

CARD_BOXES = (3, 5, 7)
CARD_MODELS = TINY.card_models
TEST_SUBSET = TINY.test_subset  # the integration test re-evaluates the first 140 canonical 7-box items


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m etbench.training.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="tiny", help="which model family")
    parser.add_argument("--out", type=Path, default=None, help="where the adapter directories go "
                        "(default: the package's assets/<family>/)")
    parser.add_argument("--monitor-every", type=monitor_every, default=0, metavar="K",
                        help="log held-out accuracy every K steps (slower; does not change the adapters)")
    parser.add_argument("--no-monitor", action="store_true",
                        help="skip the held-out accuracy log (faster; the adapters are the same)")
    parser.add_argument("--stages", default=None, help="train only these stages (comma-separated)")
    parser.add_argument("--base-only", action="store_true", help="train the first stage only")
    parser.add_argument("--ft-only", action="store_true",
                        help="train every stage but the first, on the shipped first stage")
    parser.add_argument("--card", action="store_true", help="also evaluate the models for MODEL_CARD.md")
    parser.add_argument("--card-only", action="store_true", help="only evaluate (no training)")
    parser.add_argument("--models", default=None, help="models to evaluate (comma-separated; default: the family's)")
    parser.add_argument("--boxes", type=box_counts, default=list(CARD_BOXES), help="box counts to evaluate")
    parser.add_argument("--threads", type=thread_count, default=THREADS,
                        help="torch threads for the evaluation (training always uses 2)")
    parser.add_argument("--card-json", type=Path, default=None,
                        help="results file, resumed if it exists (default OUT/card_results.json)")
    args = parser.parse_args(argv)
    family = FAMILIES[args.family]
    out = args.out or family.asset_dir
    names = [stage.name for stage in family.stages]
    stages = (args.stages.split(",") if args.stages else names[:1] if args.base_only
              else names[1:] if args.ft_only else names)
    unknown = sorted(set(stages) - set(names))
    if unknown:  # before any model loads: one usage error, not train()'s ValueError traceback
        parser.error(f"--stages: {', '.join(unknown)} not in family {family.name} ({', '.join(names)})")
    check_out(parser, out)
    try:
        run(args, family, out, names, stages)
    except EtbenchError as err:
        parser.exit(2, f"etbench: error: {err}\n")


def run(args, family, out: Path, names: list[str], stages: list[str]) -> None:
    """``main``'s work once its arguments are checked."""
    if not args.card_only:
        out.mkdir(parents=True, exist_ok=True)
        summary = train(family, out, args.monitor_every, not args.no_monitor, stages)
        log_path = out / ("training_log.json" if stages == names else f"training_log.{'+'.join(stages)}.json")
        atomic_write_text(log_path, json.dumps(summary, indent=1) + "\n")
        if out.resolve() != family.asset_dir.resolve():
            for name in stages:
                shipped = family.asset_dir / name
                if (shipped / "adapter_model.safetensors").is_file():
                    print(f"{name}: max |retrained - shipped| = {compare_adapters(out / name, shipped):.3g}")
    if args.card or args.card_only:
        path = args.card_json or out / "card_results.json"
        refs = args.models.split(",") if args.models else list(family.card_models)
        results = card_results(refs, args.boxes, family.test_subset, path,
                               threads=args.threads)
        # each fine-tune against its parent on the same items (where both records keep their item outcomes), and
        # the transfer attempts' accuracy on their own task, with and without their LoRA
        children = [stage for stage in family.stages if stage.name in refs and stage.parent]
        for stage in children:
            paired_vs_base(results, [stage.name], args.boxes, base=stage.parent)
            if stage.wording in OWN_TASK_DATA:
                own_task_results(results, [zoo_row(stage)], base=stage.parent)
        save_results(results, path)
        print(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
