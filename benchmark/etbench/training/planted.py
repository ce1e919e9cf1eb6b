"""Train the planted model: a known answer for circuit search (``tiny-planted``).

Every attention head of ``tiny-base`` outside a chosen set S is removed — replaced at every position
by its mean output over the mean-ablation prompts, folded into the weights (``models.kept_ablation``)
— and a fresh LoRA (on q/k/v and the MLPs, never on the output projection, which would read the
removed heads again) is trained on the paper's template with that ablation in place. The ablation
is kept: the shipped adapter directory carries it, and ``etbench.models.load("tiny-planted")`` folds
it in. Entity tracking can then only move between positions through the heads of S, so a correct
circuit search must return heads inside S, and the kept heads must carry the model's accuracy.

    python -m etbench.training.planted              # retrain into assets/planted/ (tiny-planted/ + training_log.json)
    python -m etbench.training.planted --out DIR    # DIR/tiny-planted/ + DIR/training_log.json;
                                                    # prints max |retrained - shipped|

S is the 26 heads of the tiny-base circuit shipped when the model was trained (the paper's top-k per group),
so the planted mechanism has the paper's shape; ``PLANTED_HEADS`` records it.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from etbench import models
from etbench.core.io import ASSETS_DIR, atomic_write_bytes, atomic_write_text
from etbench.mech.heads import head_map
from etbench.metrics.ablation import mean_activations
from etbench.models.kept_ablation import KEPT_ABLATION_FILE, KeptAblation, fold_kept_ablation, save_kept_ablation
from etbench.training.loop import THREADS, OneLineParser, compare_adapters, save_adapter
from etbench.training.tiny import Stage, monitor_accuracy, monitor_examples, train_stage

# Like etbench.training.tiny: an output root holds the adapter directory and the training log beside it.
ASSET_ROOT = ASSETS_DIR / "planted"
ADAPTER_NAME = "tiny-planted"
ASSET_DIR = ASSET_ROOT / ADAPTER_NAME
BASE_REF = "tiny-base"
# q/k/v and the MLPs: never o_proj (models.kept_ablation.check_adapter_compatible says why)
PLANTED_LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
                    target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
STAGE = Stage("tiny-planted", "paper", steps=40, lr=2e-3, seed=2, n_boxes=(7,))
# Layers below this keep every head: removing all but S's 26 heads everywhere left tiny-base at loss 10.5
# (uniform over the vocabulary) and a LoRA stuck near 4.6 after 9 steps; the planted set lives in the layers
# where tiny-base's circuit is (11-29), and the known answer is stated for those layers.
INTACT_BELOW = 11
MEAN_N = 200  # mean-ablation prompts the removed heads' constant output is averaged over


#: S, as (layer, head): the 26 heads of the tiny-base circuit that etbench shipped when the planted model was
#: trained (fast discovery, n 32, the paper's top-k per group, no pruning). Written out rather than read from
#: ``assets/circuits/tiny-base.json`` because that file is re-found as discovery improves, and the shipped
#: adapter and kept ablation were trained for exactly this set.
PLANTED_HEADS: frozenset[tuple[int, int]] = frozenset({
    (11, 8), (15, 8), (16, 1), (16, 2), (17, 2), (17, 4), (17, 5), (18, 6), (19, 1), (20, 1), (22, 4), (22, 6),
    (22, 7), (23, 0), (23, 1), (23, 2), (23, 4), (24, 5), (24, 7), (27, 3), (27, 6), (28, 0), (29, 1), (29, 2),
    (29, 7), (29, 8),
})


def planted_heads() -> set[tuple[int, int]]:
    """S: the planted heads (all in layers >= INTACT_BELOW)."""
    return set(PLANTED_HEADS)


def kept_ablation(model, tokenizer, kept: set[tuple[int, int]], n: int = MEAN_N) -> KeptAblation:
    """The ablation that removes every head outside ``kept``: each removed head's z is replaced by its
    mean over ``n`` mean-ablation prompts *and* their positions (one vector per head, so it folds
    into a bias)."""
    hm = head_map(model)
    spec = hm.spec
    mean = mean_activations(model, tokenizer, hm, n=n)
    weights = (mean.counts / mean.counts.sum()).to(torch.float64)
    removed = {}
    for layer in range(spec.n_layers):
        heads = tuple(h for h in range(spec.n_heads) if (layer, h) not in kept)
        if heads:
            per_head = torch.einsum("s,shd->hd", weights, mean.z[layer].to(torch.float64))  # [n_heads, d_head]
            removed[layer] = (heads, per_head[list(heads)].to(torch.float32))
    return KeptAblation(spec.n_layers, spec.n_heads, spec.d_head, removed)


def kept_heads(n_heads: int, planted: set[tuple[int, int]], intact_below: int = INTACT_BELOW) -> set[tuple[int, int]]:
    """The planted set plus every head of the layers below ``intact_below``."""
    return set(planted) | {(layer, head) for layer in range(intact_below) for head in range(n_heads)}


def train(out_root: Path = ASSET_ROOT, planted: set[tuple[int, int]] | None = None, steps: int = STAGE.steps,
          lr: float = STAGE.lr, monitor_every: int = 10, log=print) -> dict:
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    random.seed(0)
    t0 = time.perf_counter()
    planted = planted_heads() if planted is None else planted
    loaded = models.load(BASE_REF)
    model, tokenizer = loaded.model, loaded.tokenizer
    kept = kept_heads(head_map(model).spec.n_heads, planted)
    held_out = monitor_examples()
    summary: dict = {"planted_heads": sorted(planted), "intact_below": INTACT_BELOW, "base_monitor_accuracy": monitor_accuracy(model, tokenizer, held_out)}
    ablation = kept_ablation(model, tokenizer, kept)
    fold_kept_ablation(model, ablation)
    summary["ablated_monitor_accuracy"] = monitor_accuracy(model, tokenizer, held_out)
    log(f"{BASE_REF}: held-out accuracy {summary['base_monitor_accuracy']:.3f}; with only the {len(planted)} planted "
        f"heads kept in layers >= {INTACT_BELOW}: {summary['ablated_monitor_accuracy']:.3f}")
    stage = Stage(STAGE.name, STAGE.wording, steps, lr, STAGE.seed, STAGE.n_boxes)
    peft_model, info = train_stage(model, tokenizer, stage, held_out, monitor_every, log, lora=PLANTED_LORA)
    out_dir = out_root / ADAPTER_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    # The kept ablation first: a run stopped in between then leaves an ablation without an adapter (loading
    # fails loudly), never an adapter without its ablation (it would load, silently, as an un-ablated LoRA).
    save_kept_ablation(ablation, out_dir / KEPT_ABLATION_FILE)
    save_adapter(peft_model, out_dir, BASE_REF)
    _to_half(out_dir / "adapter_model.safetensors")  # shipped in fp16: half of 17 MB
    summary.update(info, stage=stage.__dict__, mean_n=MEAN_N, total_seconds=round(time.perf_counter() - t0, 1))
    atomic_write_text(out_root / "training_log.json", json.dumps(summary, indent=1) + "\n")
    log(f"done in {summary['total_seconds']} s")
    return summary


def _to_half(path: Path) -> None:
    from safetensors.torch import load_file, save

    tensors = {key: value.half() for key, value in load_file(str(path)).items()}
    atomic_write_bytes(path, save(tensors))


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m etbench.training.planted", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSET_ROOT,
                        help=f"output root: receives {ADAPTER_NAME}/ (the adapter) and training_log.json")
    parser.add_argument("--steps", type=int, default=STAGE.steps, help="LoRA training steps (batch 16)")
    parser.add_argument("--lr", type=float, default=STAGE.lr, help="LoRA learning rate")
    parser.add_argument("--monitor-every", type=int, default=10, help="held-out accuracy every K steps")
    args = parser.parse_args(argv)
    # refused before the base loads: the default --out is the shipped adapter, which a bad run would replace
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if not 0 < args.lr < float("inf"):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.monitor_every < 0:
        parser.error(f"--monitor-every must be 0 or more, got {args.monitor_every}")
    train(args.out, steps=args.steps, lr=args.lr, monitor_every=args.monitor_every)
    if args.out.resolve() != ASSET_ROOT.resolve() and ASSET_DIR.exists():
        print(f"max |retrained - shipped| = {compare_adapters(args.out / ADAPTER_NAME, ASSET_DIR):.3g}")


if __name__ == "__main__":
    main()
