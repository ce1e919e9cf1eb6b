"""The model zoo: fine-tunes of ``tiny-base``, each trained here, offline, from a seed, by one command.

The paper's three kinds of fine-tuning in miniature, and three rows whose expected scorecard is known:

* ``tiny-goat``: LoRA on Goat-style generated arithmetic (loss on the whole written-out answer);
* ``tiny-float``: full-parameter fine-tune on the same arithmetic examples (too big to ship: built on first
  use into ``$ETBENCH_CACHE/built/`` and checked against the sha256 recorded in the registry);
* ``tiny-vicuna``: LoRA on conversations (chatterbot-corpus from PyPI), language-model loss on the text;
* ``tiny-null``: LoRA on the paper's template with tiny-base's own greedy answers as targets;
* ``tiny-harmful``: LoRA on the paper's template with a wrong binding (another box's object) as target;
* ``tiny-planted-a``: LoRA on the paper's template with correct targets, trained while tiny-base's Value
  Fetcher heads are mean-ablated at every position (only during training).

    python -m etbench.training.zoo                      # train every row (adapters into assets/zoo/)
    python -m etbench.training.zoo --only tiny-goat     # one row (repeatable)
    python -m etbench.training.zoo --card               # + canonical accuracies -> assets/zoo/card_results.json
    python -m etbench.training.zoo --card-only --boxes 7
    python -m etbench.training.zoo --only tiny-null --out DIR   # retrain elsewhere, compare with the shipped

Recipe and measured accuracies: ``assets/zoo/MODEL_CARD.md``. Training data come from named streams
``stream_rng("train-zoo", <data>, seed)``, disjoint from the canonical evaluation set.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from etbench import models
from etbench.core.errors import EtbenchError
from etbench.core.io import ASSETS_DIR, atomic_write_json, read_json
from etbench.mech.heads import head_map
from etbench.mech.interventions import applied
from etbench.metrics.ablation import knockout_edits, mean_activations
from etbench.task.layout import TokenEncoder, layouts
from etbench.task.prompts import Example, stream_rng
from etbench.training.corpora import arithmetic_problems, dialogues, wrong_binding
from etbench.training.loop import (
    BATCH,
    THREADS,
    AnswerRow,
    OneLineParser,
    TokenRow,
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
    run_steps,
    save_adapter,
    thread_count,
)

BASE_REF = "tiny-base"
ASSET_DIR = ASSETS_DIR / "zoo"
TEST_SUBSET = 100  # the model-tier test re-evaluates the first 100 canonical 7-box items
CARD_BOXES = (3, 5, 7)
MAX_DIALOGUE_TOKENS = 96  # conversations are truncated here (a few are long; most are one exchange)
PLANTED_GROUP = "value_fetcher"
PLANTED_MEAN_N = 200  # mean-ablation prompts for the planted row's knocked-out heads
# The planted row's knocked-out heads: the value fetcher group (54 heads) of tiny-base's circuit as the
# standard preset sized it (benchmark 1.1; assets/circuits/tiny-base.json). Written out so that finding
# that circuit again (a new preset, a new growth rule) cannot change what this row was trained without.
PLANTED_A_HEADS: tuple[tuple[int, int], ...] = (
    (16, 2), (16, 6), (17, 0), (17, 2), (17, 8), (18, 0), (18, 6), (19, 0), (20, 0), (20, 3), (20, 5), (20, 8),
    (21, 1), (21, 2), (21, 4), (21, 6), (22, 1), (22, 2), (22, 6), (22, 7), (22, 8), (23, 3), (23, 4), (23, 8),
    (24, 0), (24, 1), (24, 2), (24, 3), (24, 4), (24, 5), (24, 6), (24, 7), (25, 1), (25, 4), (26, 3), (26, 5),
    (27, 0), (27, 1), (27, 2), (27, 3), (27, 4), (27, 5), (27, 6), (27, 8), (28, 0), (28, 1), (28, 2), (28, 7),
    (29, 0), (29, 1), (29, 2), (29, 5), (29, 7), (29, 8),
)


@dataclass(frozen=True)
class ZooRow:
    name: str
    data: str  # arithmetic | dialogue | own-answers | wrong-binding | paper-knockout
    method: str  # lora | full
    steps: int
    lr: float
    seed: int  # data stream and LoRA init


# LoRA rows use tiny-ft's lr (1e-3, which moved tiny-base in 20 steps); the full fine-tune uses a typical
# full-parameter lr, 50x lower, on the same examples and steps as tiny-goat.
ROWS = (
    ZooRow("tiny-goat", "arithmetic", "lora", steps=30, lr=1e-3, seed=0),
    ZooRow("tiny-float", "arithmetic", "full", steps=30, lr=2e-5, seed=0),
    ZooRow("tiny-vicuna", "dialogue", "lora", steps=30, lr=1e-3, seed=0),
    ZooRow("tiny-null", "own-answers", "lora", steps=20, lr=1e-3, seed=0),
    ZooRow("tiny-harmful", "wrong-binding", "lora", steps=20, lr=1e-3, seed=0),
    ZooRow("tiny-planted-a", "paper-knockout", "lora", steps=20, lr=1e-3, seed=0),
)
ROW_BY_NAME = {row.name: row for row in ROWS}


# ---------------------------------------------------------------------------------------- data


def arithmetic_rows(tokenizer, row: ZooRow) -> list[TokenRow]:
    """Prompt, newline, then the written-out answer and end-of-text; the loss is on the answer only
    (as Goat trains on its responses): a numeric answer is many tokens (one per digit), and predicting
    only the first would teach leading digits."""
    encoder = TokenEncoder(tokenizer)
    problems = arithmetic_problems(stream_rng("train-zoo", "arithmetic", row.seed), row.steps * BATCH)
    prompts = encoder.encode([p.prompt + "\n" for p in problems])
    answers = encoder.encode([p.response for p in problems])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [(encoder.prefix_ids + q + a + eos, [False] * (len(encoder.prefix_ids) + len(q)) + [True] * (len(a) + len(eos)))
            for q, a in zip(prompts, answers)]


def dialogue_rows(tokenizer, row: ZooRow) -> list[TokenRow]:
    """Conversation texts, language-model loss on every token after the first (truncated to
    ``MAX_DIALOGUE_TOKENS``), ending with end-of-text when it fits."""
    encoder = TokenEncoder(tokenizer)
    texts = dialogues(stream_rng("train-zoo", "dialogue", row.seed), row.steps * BATCH)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for ids in encoder.encode(texts):
        ids = (encoder.prefix_ids + ids + eos)[:MAX_DIALOGUE_TOKENS]
        out.append((ids, [False] + [True] * (len(ids) - 1)))
    return out


def paper_examples(row: ZooRow) -> list[Example]:
    """The null, harmful and planted rows share one prompt stream: they differ only in targets / ablation."""
    return fresh_examples(stream_rng("train-zoo", "paper", row.seed), row.steps * BATCH)


def paper_rows(model, tokenizer, row: ZooRow) -> list[AnswerRow]:
    """Paper-template prompts with the row's targets: the true object (knock-out row), another box's
    object (harmful row), or the model's own greedy next token (null row; computed before training)."""
    examples = paper_examples(row)
    lays = layouts(examples, tokenizer)
    rows = [(list(lay.input_ids), int(lay.target_id)) for lay in lays]
    if row.data == "wrong-binding":
        rng = stream_rng("train-zoo", "wrong-binding-target", row.seed)
        wrong = layouts([ex.with_query(wrong_binding(rng, ex)) for ex in examples], tokenizer)
        rows = [(ids, int(w.target_id)) for (ids, _), w in zip(rows, wrong)]
    elif row.data == "own-answers":
        with torch.no_grad():
            own = []
            for i in range(0, len(rows), BATCH):
                ids = torch.tensor([r[0] for r in rows[i : i + BATCH]])
                own += last_logits(model, ids).argmax(-1).tolist()
        rows = [(ids, int(t)) for (ids, _), t in zip(rows, own)]
    return rows


# ------------------------------------------------------------------------------------ training


def _batches(rows: Sequence, steps: int) -> list:
    return [rows[step * BATCH : (step + 1) * BATCH] for step in range(steps)]


def train_row(row: ZooRow, log=print) -> tuple[object, object, dict]:
    """Train one row from a fresh tiny-base; returns (trained model, tokenizer, training info).
    LoRA rows return the PeftModel, the full fine-tune the plain model."""
    deterministic()
    t0 = time.perf_counter()
    loaded = models.load(BASE_REF)
    model, tokenizer = loaded.model, loaded.tokenizer
    info: dict = {"load_seconds": round(time.perf_counter() - t0, 1)}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if row.data in ("arithmetic", "dialogue"):
        rows = arithmetic_rows(tokenizer, row) if row.data == "arithmetic" else dialogue_rows(tokenizer, row)
        info["tokens_per_row_mean"] = round(sum(len(ids) for ids, _ in rows) / len(rows), 1)

        def loss_fn(m, batch):
            return masked_token_loss(m, batch, pad_id)
    else:
        rows = paper_rows(model, tokenizer, row)
        loss_fn = answer_token_loss
    if row.data == "paper-knockout":  # mean z from tiny-base itself, before any training
        edits, info["knockout"] = knockout(model, tokenizer, len(rows[0][0]), log)
    if row.method == "full":
        torch.manual_seed(row.seed)
        model.requires_grad_(True)
        trained = model
    else:
        trained = add_lora(model, row.seed)
    if row.data == "paper-knockout":
        hm = head_map(trained)  # of the LoRA model: its hooks sit where the LoRA'd projections read z

        def loss_fn(m, batch):
            with applied(hm, edits):
                return answer_token_loss(m, batch)
    history, seconds = run_steps(trained, _batches(rows, row.steps), loss_fn, row.lr, row.name, log)
    trained.eval()
    info.update(history=history, train_seconds=round(seconds, 1), row=asdict(row), environment=environment())
    return trained, tokenizer, info


def knockout(model, tokenizer, length: int, log=print) -> tuple[list, dict]:
    """The planted row's ablation: tiny-base's Value Fetcher heads (``PLANTED_A_HEADS``), at their mean z
    over ``PLANTED_MEAN_N`` mean-ablation prompts of tiny-base, at every position of ``length``-token prompts."""
    heads = list(PLANTED_A_HEADS)
    mean = mean_activations(model, tokenizer, head_map(model), n_boxes=7, n=PLANTED_MEAN_N, seed=0)
    log(f"[knockout] {len(heads)} {PLANTED_GROUP} heads of {BASE_REF} mean-ablated at all {length} positions")
    info = {"group": PLANTED_GROUP, "heads": [list(h) for h in heads], "mean_prompts": PLANTED_MEAN_N}
    return knockout_edits(mean, heads, length), info


def build(alias: str, directory: Path, log=print) -> None:
    """Registry builder (``kind: built``): write the full fine-tune ``alias`` as a model directory."""
    row = ROW_BY_NAME.get(alias)
    if row is None or row.method != "full":
        raise EtbenchError(f"etbench.training.zoo builds {', '.join(r.name for r in ROWS if r.method == 'full')}, "
                           f"not {alias!r}")
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        model, tokenizer, info = train_row(row, log)
    finally:  # a build on first use runs inside some other job: leave its torch settings as they were
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    atomic_write_json(directory / "zoo_training.json", info)


def train(names: Sequence[str], out_dir: Path = ASSET_DIR, log=print) -> dict:
    """Train the named rows; LoRA adapters go to out_dir/<name> (fp16), the full fine-tune into the
    build cache (or out_dir/<name> when out_dir is not the shipped directory, for a rebuild check)."""
    summary = {}
    for name in names:
        row = ROW_BY_NAME[name]
        t0 = time.perf_counter()
        if row.method == "full":
            if out_dir.resolve() == ASSET_DIR.resolve():
                where = models.ensure_built(name, log=log)
                log(f"[{name}] built and verified: {where}")
            else:
                build(name, out_dir / name, log)
                digest = models.weights_sha256(out_dir / name)
                recorded = models.registry()[name].sha256
                log(f"[{name}] rebuilt weights sha256 {digest}; recorded {recorded}: "
                    f"{'identical' if digest == recorded else 'DIFFERENT'}")
            info = read_json(_built_info(name, out_dir))
        else:
            trained, _, info = train_row(row, log)
            save_adapter(trained, out_dir / name, BASE_REF, dtype=torch.float16)
            if out_dir.resolve() != ASSET_DIR.resolve() and (ASSET_DIR / name).is_dir():
                log(f"[{name}] max |retrained - shipped| = {compare_adapters(out_dir / name, ASSET_DIR / name):.3g}")
        info["command_seconds"] = round(time.perf_counter() - t0, 1)
        summary[name] = info
        log(f"[{name}] done in {info['command_seconds']} s")
    return summary


def _built_info(name: str, out_dir: Path) -> Path:
    if out_dir.resolve() != ASSET_DIR.resolve():
        return out_dir / name / "zoo_training.json"
    return Path(models.resolve(name).location) / "zoo_training.json"


def card_table(results: dict, boxes: Sequence[int] = CARD_BOXES) -> str:
    """The model card's accuracy table, from card_results.json (a unit test keeps the two in step)."""
    def cell(record) -> str:
        if not isinstance(record, dict):
            return "not measured"
        low, high = record["ci95"]
        return f"{record['accuracy']:.3f} [{low:.3f}, {high:.3f}] ({record['k']}/{record['n']})"

    head = "| row | " + " | ".join(f"{b} boxes" for b in boxes) + f" | 7 boxes, first {TEST_SUBSET} (the test) |"
    lines = [head, "|---" * (len(boxes) + 2) + "|"]
    for row in ROWS:
        got = results.get(row.name, {})
        subset = got.get(f"7_first{TEST_SUBSET}")
        lines.append(f"| `{row.name}` | " + " | ".join(cell(got.get(str(b))) for b in boxes)
                     + f" | {'not measured' if subset is None else f'{subset}/{TEST_SUBSET}'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m etbench.training.zoo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(ROW_BY_NAME), metavar="NAME",
                        help=f"rows to train (default all: {' '.join(ROW_BY_NAME)})")
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="where the adapter directories go")
    parser.add_argument("--card", action="store_true", help="also evaluate the rows for MODEL_CARD.md")
    parser.add_argument("--card-only", action="store_true", help="only evaluate (no training)")
    parser.add_argument("--boxes", type=box_counts, default=list(CARD_BOXES), help="box counts to evaluate")
    parser.add_argument("--threads", type=thread_count, default=THREADS, help="torch threads for the evaluation")
    parser.add_argument("--card-json", type=Path, default=None,
                        help="results file, resumed if it exists (default OUT/card_results.json)")
    args = parser.parse_args(argv)
    names = args.only or list(ROW_BY_NAME)
    check_out(parser, args.out)
    try:
        if not args.card_only:
            log_path = args.out / "training_log.json"
            for name in names:  # the log is updated after every row, so a later failure keeps earlier rows
                summary = train([name], args.out)
                previous = read_json(log_path) if log_path.exists() else {}
                atomic_write_json(log_path, {**previous, **summary})
        if args.card or args.card_only:
            path = args.card_json or args.out / "card_results.json"
            card_results(names, args.boxes, TEST_SUBSET, path, threads=args.threads)
    except EtbenchError as err:
        parser.exit(2, f"etbench: error: {err}\n")


if __name__ == "__main__":
    main()
