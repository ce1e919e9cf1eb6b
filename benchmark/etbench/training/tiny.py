"""Train the embedded base / fine-tuned pair: the paper's Goat story in miniature.

``tiny-base`` = SmolLM2-135M-Instruct + a LoRA trained for a few steps on the paper's template, so
that it tracks entities clearly above chance but far from perfectly (shipped as an adapter that is
merged at load). ``tiny-ft`` = tiny-base + a second LoRA trained *only* on another wording of the
task that keeps the object-before-label structure (``a key sits inside crate Q; … . Crate Q holds
a`` → `` key``) and never on the paper's template (shipped as a non-merged PEFT adapter). Whether
this fine-tuning improves entity tracking on the paper's template is measured, not forced
(``assets/tiny/MODEL_CARD.md`` records the recipe and its measured accuracies).

    python -m etbench.training.tiny                  # retrain both adapters into assets/tiny/
    python -m etbench.training.tiny --card           # + evaluate smollm2/tiny-base/tiny-ft on the
                                                  #   canonical sets, write assets/tiny/card_results.json
    python -m etbench.training.tiny --out DIR --no-monitor [--base-only | --ft-only]
                                  # retrain elsewhere and print max |retrained - shipped| per adapter
    python -m etbench.training.tiny --card-only --models tiny-ft --boxes 7 --card-json FILE
                                  # evaluate only some models / box counts (resumable)

Training data come from named random streams (``stream_rng("train-tiny", ...)``) that never meet
the canonical evaluation set (``generate(n_boxes, 500, seed=0)``, stream ``data:0:n``).
Everything is seeded; CPU fp32 with 2 threads reproduces the shipped adapters.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from etbench import models
from etbench.core.io import ASSETS_DIR, atomic_write_text
from etbench.metrics.accuracy import evaluate
from etbench.task.layout import TokenEncoder, layouts
from etbench.task.prompts import LABELS, Example, paper_objects, sample_context, stream_rng
from etbench.training.loop import (
    BATCH,
    LORA,
    THREADS,
    AnswerRow,
    add_lora,
    answer_token_loss,
    card_results,
    compare_adapters,
    deterministic,
    environment,
    fresh_examples,
    last_logits,
    run_steps,
    save_adapter,
    stack_rows,
)

BASE_REF = "smollm2-135m-instruct"
ASSET_DIR = ASSETS_DIR / "tiny"


@dataclass(frozen=True)
class Stage:
    name: str  # adapter directory under the output dir
    wording: str  # "paper" or "crate"
    steps: int
    lr: float
    seed: int
    n_boxes: tuple[int, ...]  # box counts, cycled over batches (one box count per batch)


# A LoRA recipe verified earlier used 10 base steps at lr 3e-4 (7-box acc 0.44 there); with this data stream 10
# steps gave 0.31 on the held-out monitor and 16 gave 0.44, so the base trains 18 steps (0.52).
# ft: lr 1e-3, seed 1, crate wording only; 20 steps (recipe: 0.84 after 20 steps, 0.85 after 30).
STAGES = (
    Stage("tiny-base", "paper", steps=18, lr=3e-4, seed=0, n_boxes=(7,)),
    Stage("tiny-ft", "crate", steps=20, lr=1e-3, seed=1, n_boxes=(7,)),
)
MONITOR_N = 140  # held-out paper-template prompts (7 boxes) for the training log


# ---------------------------------------------------------------------------------------- data


def crate_prompt(example: Example) -> tuple[str, str]:
    """The fine-tuning wording (training data only, not benchmark data): objects still come
    before their labels, so plain copying of the token after the label does not solve it."""
    body = "; ".join(f"a {o} sits inside crate {lab}" for o, lab in zip(example.objects, example.labels))
    body = body[0].upper() + body[1:]
    return f"{body}. Crate {example.query_label} holds a", " " + example.answer


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
    encoder = TokenEncoder(tokenizer)
    pairs = [crate_prompt(ex) for ex in examples]
    ids = encoder.encode([p for p, _ in pairs] + [p + t for p, t in pairs])
    out = []
    for i in range(len(pairs)):
        prompt, whole = ids[i], ids[len(pairs) + i]
        if whole[: len(prompt)] != prompt or len(whole) != len(prompt) + 1:
            raise RuntimeError(f"answer is not one token after the prompt: {pairs[i]!r}")
        out.append((encoder.prefix_ids + prompt, whole[-1]))
    return out


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
    if monitor and stage.wording != "paper":
        before = wording_accuracy(model, tokenizer, monitor, stage.wording)
        log(f"[{stage.name}] before training, accuracy in its training wording: {before:.3f}")
    peft_model = add_lora(model, stage.seed, lora)
    rows = encode(tokenizer, training_examples(stage, stage.steps * BATCH), stage.wording)

    def after_step(step: int, entry: dict) -> None:
        if monitor and monitor_every and step % monitor_every == 0 and step < stage.steps:
            entry["monitor_accuracy"] = monitor_accuracy(peft_model, tokenizer, monitor)
            log(f"[{stage.name}] step {step}: held-out accuracy {entry['monitor_accuracy']:.3f}")

    batches = [rows[step * BATCH : (step + 1) * BATCH] for step in range(stage.steps)]
    history, train_seconds = run_steps(peft_model, batches, answer_token_loss, stage.lr, stage.name, log, after_step)
    info = {"history": history, "train_seconds": round(train_seconds, 1)}
    if before is not None:
        info["own_wording_accuracy_before"] = before
    if monitor:
        info["monitor_accuracy"] = monitor_accuracy(peft_model, tokenizer, monitor)
        log(f"[{stage.name}] held-out 7-box paper-template accuracy {info['monitor_accuracy']:.3f} (n={len(monitor)})")
        if stage.wording != "paper":
            info["own_wording_accuracy"] = wording_accuracy(peft_model, tokenizer, monitor, stage.wording)
            log(f"[{stage.name}] same prompts in its training wording: {info['own_wording_accuracy']:.3f}")
    return peft_model, info


def train(out_dir: Path = ASSET_DIR, monitor_every: int = 0, monitor: bool = True, n_stages: int = len(STAGES),
          first_stage: int = 0, log=print) -> dict:
    """Train the stages in order; writes out_dir/tiny-base and out_dir/tiny-ft (PEFT adapter dirs).
    ``n_stages=1`` trains tiny-base only; ``first_stage=1`` trains tiny-ft on the *shipped* tiny-base
    as ``etbench.models.load("tiny-base")`` returns it (quicker reproducibility checks)."""
    deterministic()
    t0 = time.perf_counter()
    start_ref = BASE_REF if first_stage == 0 else STAGES[first_stage - 1].name
    loaded = models.load(start_ref)
    model, tokenizer = loaded.model, loaded.tokenizer
    log(f"loaded {start_ref} in {time.perf_counter() - t0:.1f} s")
    held_out = monitor_examples() if monitor else []
    summary = {}
    if held_out:
        summary["base_monitor_accuracy"] = monitor_accuracy(model, tokenizer, held_out)
        log(f"[{BASE_REF}] held-out 7-box paper-template accuracy {summary['base_monitor_accuracy']:.3f}")
    base_of = {"tiny-base": BASE_REF, "tiny-ft": "tiny-base"}
    for stage in STAGES[first_stage:n_stages]:
        peft_model, info = train_stage(model, tokenizer, stage, held_out, monitor_every, log)
        save_adapter(peft_model, out_dir / stage.name, base_of[stage.name])
        summary[stage.name] = {**info, "stage": stage.__dict__}
        model = peft_model.merge_and_unload()  # the next stage trains on top of the merged model
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    summary["environment"] = environment()
    log(f"done in {summary['total_seconds']} s")
    return summary


# ---------------------------------------------------------------------------------- model card

CARD_BOXES = (3, 5, 7)
CARD_MODELS = (BASE_REF, "tiny-base", "tiny-ft")
TEST_SUBSET = 140  # the integration test re-evaluates the first 140 canonical 7-box items


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m etbench.training.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="where the adapter directories go")
    parser.add_argument("--monitor-every", type=int, default=0, metavar="K",
                        help="log held-out accuracy every K steps (slower; does not change the adapters)")
    parser.add_argument("--no-monitor", action="store_true",
                        help="skip the held-out accuracy log (faster; the adapters are the same)")
    parser.add_argument("--base-only", action="store_true", help="train tiny-base only (quick reproducibility check)")
    parser.add_argument("--ft-only", action="store_true",
                        help="train tiny-ft only, on the shipped tiny-base (quick reproducibility check)")
    parser.add_argument("--card", action="store_true", help="also evaluate the models for MODEL_CARD.md")
    parser.add_argument("--card-only", action="store_true", help="only evaluate (no training)")
    parser.add_argument("--models", default=",".join(CARD_MODELS), help="models to evaluate (comma-separated)")
    parser.add_argument("--boxes", default=",".join(map(str, CARD_BOXES)), help="box counts to evaluate")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="torch threads for the evaluation (training always uses 2)")
    parser.add_argument("--card-json", type=Path, default=None,
                        help="results file, resumed if it exists (default OUT/card_results.json)")
    args = parser.parse_args(argv)
    if not args.card_only:
        summary = train(args.out, args.monitor_every, not args.no_monitor, 1 if args.base_only else len(STAGES),
                        1 if args.ft_only else 0)
        atomic_write_text(args.out / "training_log.json", json.dumps(summary, indent=1) + "\n")
        if args.out.resolve() != ASSET_DIR.resolve():
            for stage in STAGES[1 if args.ft_only else 0 : 1 if args.base_only else len(STAGES)]:
                print(f"{stage.name}: max |retrained - shipped| = "
                      f"{compare_adapters(args.out / stage.name, ASSET_DIR / stage.name):.3g}")
    if args.card or args.card_only:
        path = args.card_json or args.out / "card_results.json"
        results = card_results(args.models.split(","), [int(b) for b in args.boxes.split(",")], TEST_SUBSET, path,
                               threads=args.threads)
        print(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
