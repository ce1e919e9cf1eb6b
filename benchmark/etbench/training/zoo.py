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

Four rows trained by other objectives or on other tasks (issue #28):

* ``tiny-dpo``: LoRA by DPO (reference = tiny-base) on preference pairs in a held-out wording of the task
  (locker wording): chosen = the right object, rejected = another box's object of the same context;
* ``tiny-grpo``: LoRA by GRPO (groups of sampled answers, reward = exact match, KL penalty to tiny-base) on
  key-value recall, a task with no boxes and no objects;
* ``tiny-code``: supervised LoRA on variable lookup in Python REPL sessions (transfer attempt);
* ``tiny-kv``: supervised LoRA on key-value recall, the same prompts as tiny-grpo (transfer attempt).

    python -m etbench.training.zoo                      # train every row (adapters into assets/zoo/)
    python -m etbench.training.zoo --only tiny-goat     # one row (repeatable)
    python -m etbench.training.zoo --card               # + canonical accuracies -> assets/zoo/card_results.json
    python -m etbench.training.zoo --card-only --boxes 7
    python -m etbench.training.zoo --only tiny-dpo --card --boxes 7   # + tiny-base's items, paired difference
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
from etbench.core.stats import format_p, mcnemar
from etbench.mech.heads import head_map
from etbench.mech.interventions import applied
from etbench.metrics.ablation import knockout_edits, mean_activations
from etbench.task.layout import TokenEncoder, layouts
from etbench.task.prompts import Example, stream_rng
from etbench.training.corpora import (
    arithmetic_problems,
    code_lookup,
    dialogues,
    kv_recall,
    locker_prompt,
    wrong_binding,
)
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
    next_token_logprobs,
    pad_token_id,
    padded_answer_token_loss,
    prompt_answer_rows,
    run_steps,
    save_adapter,
    thread_count,
)
from etbench.training.preference import dpo_batch_loss, grpo_batch_loss

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
    data: str  # arithmetic | dialogue | own-answers | wrong-binding | paper-knockout | locker-pairs | kv | code
    method: str  # lora | full: which parameters train
    steps: int
    lr: float
    seed: int  # data stream, LoRA init and (GRPO) sampling
    objective: str = "sft"  # sft (cross-entropy on targets) | dpo | grpo (etbench.training.preference)


# DPO: beta 0.1 (the DPO paper's usual value). GRPO: 8 sampled answers per prompt, KL weight 0.04 (DeepSeekMath's).
DPO_BETA = 0.1
GRPO_GROUP = 8
GRPO_BETA = 0.04
OWN_TASK_N = 96  # held-out prompts of a row's own training task (own_task_accuracy)
OWN_TASK_DATA = ("locker-pairs", "kv", "code")


# LoRA rows use tiny-ft's lr (1e-3, which moved tiny-base in 20 steps); the full fine-tune uses a typical
# full-parameter lr, 50x lower, on the same examples and steps as tiny-goat.
ROWS = (
    ZooRow("tiny-goat", "arithmetic", "lora", steps=30, lr=1e-3, seed=0),
    ZooRow("tiny-float", "arithmetic", "full", steps=30, lr=2e-5, seed=0),
    ZooRow("tiny-vicuna", "dialogue", "lora", steps=30, lr=1e-3, seed=0),
    ZooRow("tiny-null", "own-answers", "lora", steps=20, lr=1e-3, seed=0),
    ZooRow("tiny-harmful", "wrong-binding", "lora", steps=20, lr=1e-3, seed=0),
    ZooRow("tiny-planted-a", "paper-knockout", "lora", steps=20, lr=1e-3, seed=0),
    # Issue #28. DPO keeps the zoo's lr (Adam normalises the gradient's scale, so DPO's small beta-weighted
    # gradients move the LoRA as far per step as cross-entropy's). GRPO uses tiny-base's lr, 3e-4: an earlier,
    # lost attempt at 1e-3 was reported unstable (not re-measured here).
    ZooRow("tiny-dpo", "locker-pairs", "lora", steps=20, lr=1e-3, seed=0, objective="dpo"),
    ZooRow("tiny-grpo", "kv", "lora", steps=20, lr=3e-4, seed=0, objective="grpo"),
    ZooRow("tiny-code", "code", "lora", steps=20, lr=1e-3, seed=0),
    ZooRow("tiny-kv", "kv", "lora", steps=20, lr=1e-3, seed=0),
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


def recall_rows(tokenizer, row: ZooRow, n: int | None = None, stream: str = "train-zoo") -> list[AnswerRow]:
    """Key-value recall or code lookup prompts with their one-token answer (n: the row's training examples).
    tiny-kv and tiny-grpo share the stream ``train-zoo:kv:<seed>``: the same prompts, learnt from targets or
    from rewards. ``stream`` ``heldout-zoo``: prompts of the same task that no row trains on."""
    rng = stream_rng(stream, row.data, row.seed)
    items = (kv_recall if row.data == "kv" else code_lookup)(rng, row.steps * BATCH if n is None else n)
    return prompt_answer_rows(tokenizer, [(item.prompt, item.answer) for item in items])


def preference_rows(tokenizer, row: ZooRow, n: int | None = None,
                    stream: str = "train-zoo") -> list[tuple[list[int], int, int]]:
    """(prompt ids, chosen token, rejected token): locker-wording prompts (``corpora.locker_prompt``), the
    right object chosen, another box's object of the same context rejected (n and stream as ``recall_rows``)."""
    examples = fresh_examples(stream_rng(stream, "locker", row.seed), row.steps * BATCH if n is None else n)
    rng = stream_rng(stream, "locker-rejected", row.seed)
    chosen = prompt_answer_rows(tokenizer, [locker_prompt(ex) for ex in examples])
    rejected = prompt_answer_rows(tokenizer, [locker_prompt(ex, wrong_binding(rng, ex)) for ex in examples])
    if any(c[0] != r[0] or c[1] == r[1] for c, r in zip(chosen, rejected)):
        raise RuntimeError("a preference pair must share its prompt and differ in its answer")
    return [(ids, c, r) for (ids, c), (_, r) in zip(chosen, rejected)]


def objective_loss(row: ZooRow, tokenizer, stats: dict):
    """(rows, loss_fn) of the rows trained on recall/code data or by DPO/GRPO; ``stats`` receives the
    objective's per-batch diagnostics (reward, preference accuracy, KL) for the training log."""
    pad_id = pad_token_id(tokenizer)
    if row.objective == "dpo":
        return preference_rows(tokenizer, row), lambda m, batch: dpo_batch_loss(m, batch, pad_id, DPO_BETA, stats)
    rows = recall_rows(tokenizer, row)
    if row.objective == "grpo":
        generator = torch.Generator().manual_seed(row.seed)  # the sampled groups are fixed by the seed too

        def loss_fn(m, batch):
            return grpo_batch_loss(m, batch, pad_id, GRPO_GROUP, GRPO_BETA, generator, stats)
        return rows, loss_fn
    return rows, lambda m, batch: padded_answer_token_loss(m, batch, pad_id)


@torch.no_grad()
def own_task_accuracy(model, tokenizer, row: ZooRow, n: int = OWN_TASK_N) -> float:
    """Greedy top-1 accuracy on n held-out prompts of the task a locker/kv/code row trained on (stream
    ``heldout-zoo``): did the row learn its own task? (The DPO row: the chosen, i.e. right, object.)"""
    pad_id = pad_token_id(tokenizer)
    if row.data == "locker-pairs":
        rows = [(ids, chosen) for ids, chosen, _ in preference_rows(tokenizer, row, n, "heldout-zoo")]
    else:
        rows = recall_rows(tokenizer, row, n, "heldout-zoo")
    correct = 0
    for i in range(0, len(rows), BATCH):
        batch = rows[i : i + BATCH]
        predicted = next_token_logprobs(model, [ids for ids, _ in batch], pad_id).argmax(-1)
        correct += int((predicted == torch.tensor([t for _, t in batch])).sum())
    return correct / len(rows)


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
    pad_id = pad_token_id(tokenizer)
    stats: dict = {}  # the DPO / GRPO losses' diagnostics of the latest batch
    if row.data in ("locker-pairs", "kv", "code"):
        rows, loss_fn = objective_loss(row, tokenizer, stats)
    elif row.data in ("arithmetic", "dialogue"):
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

    def after_step(step: int, entry: dict) -> None:
        if stats:
            entry.update(stats)
            log(f"[{row.name}] step {step}: {', '.join(f'{k} {v}' for k, v in stats.items())}")

    history, seconds = run_steps(trained, _batches(rows, row.steps), loss_fn, row.lr, row.name, log, after_step)
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

    def paired(record) -> str:
        if not isinstance(record, dict):
            return "not measured"
        low, high = record["ci95"]
        return f"{record['difference']:+.3f} [{low:+.3f}, {high:+.3f}], p {format_p(record['mcnemar_p'])}"

    head = ("| row | " + " | ".join(f"{b} boxes" for b in boxes) + f" | 7 boxes, first {TEST_SUBSET} (the test) "
            f"| 7 boxes vs {BASE_REF} (paired difference, McNemar p) |")
    lines = [head, "|---" * (len(boxes) + 3) + "|"]
    for row in ROWS:
        got = results.get(row.name, {})
        subset = got.get(f"7_first{TEST_SUBSET}")
        lines.append(f"| `{row.name}` | " + " | ".join(cell(got.get(str(b))) for b in boxes)
                     + f" | {'not measured' if subset is None else f'{subset}/{TEST_SUBSET}'} "
                     + f"| {paired(got.get(f'7_vs_{BASE_REF}'))} |")
    return "\n".join(lines)


def paired_vs_base(results: dict, names: Sequence[str], boxes: Sequence[int], base: str = BASE_REF) -> None:
    """Add to each named row, per box count, its paired accuracy difference from ``base`` on the same canonical
    items (key ``<boxes>_vs_<base>``: difference row - base with its paired bootstrap 95% CI, exact McNemar p,
    discordant counts), where card_results recorded both models' item outcomes."""
    for name in names:
        for n_boxes in boxes:
            mine, theirs = results.get(name, {}).get(str(n_boxes)), results.get(base, {}).get(str(n_boxes))
            if not (isinstance(mine, dict) and isinstance(theirs, dict) and "correct" in mine and "correct" in theirs):
                continue
            test = mcnemar([c == "1" for c in theirs["correct"]], [c == "1" for c in mine["correct"]])
            diff = test.difference
            results[name][f"{n_boxes}_vs_{base}"] = {
                "difference": round(diff.value, 4), "ci95": [round(diff.low, 4), round(diff.high, 4)],
                "mcnemar_p": float(f"{test.p_value:.3g}"), "n": test.n, "base_only": test.a_only,
                "row_only": test.b_only}


def own_task_results(results: dict, rows: Sequence[ZooRow], base: str = BASE_REF, log=print) -> None:
    """Add to each locker/kv/code row (an unmerged LoRA on ``base``) its ``own_task_accuracy`` and its base's
    (the row's LoRA disabled) on the same held-out prompts (key ``own_task``); rows already measured are kept."""
    for row in rows:
        if row.data not in OWN_TASK_DATA or "own_task" in results.get(row.name, {}):
            continue
        loaded = models.load(row.name)
        accuracy = own_task_accuracy(loaded.model, loaded.tokenizer, row)
        with loaded.model.disable_adapter():
            base_accuracy = own_task_accuracy(loaded.model, loaded.tokenizer, row)
        results.setdefault(row.name, {})["own_task"] = {"data": row.data, "n": OWN_TASK_N,
                                                        "accuracy": round(accuracy, 4), base: round(base_accuracy, 4)}
        log(f"[{row.name}] own task ({row.data}, {OWN_TASK_N} held-out prompts): {accuracy:.3f}, "
            f"{base} {base_accuracy:.3f}")


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
            # tiny-base's own item outcomes first: every row's paired difference is taken against them
            results = card_results([BASE_REF, *names], args.boxes, TEST_SUBSET, path, threads=args.threads)
            paired_vs_base(results, names, args.boxes)
            own_task_results(results, [ROW_BY_NAME[name] for name in names])
            atomic_write_json(path, results)
    except EtbenchError as err:
        parser.exit(2, f"etbench: error: {err}\n")


if __name__ == "__main__":
    main()
