"""What every etbench training recipe shares (``training.tiny``, ``training.zoo``): the LoRA shape, the
deterministic CPU setup, batching, the two losses, the optimisation loop, saving adapters, and the model
card's canonical accuracy table.

Losses: ``answer_token_loss`` is the cross-entropy of one answer token at the last prompt position (the
entity-tracking recipes); ``masked_token_loss`` is the language-model loss over the tokens a mask marks
(a whole text, or only an answer after its prompt), on right-padded batches.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from etbench import models
from etbench.core.io import atomic_write_json, check_output_dir
from etbench.core.stats import proportion_ci
from etbench.metrics.accuracy import evaluate
from etbench.task.layout import TokenEncoder
from etbench.task.prompts import (
    CANONICAL_N,
    CANONICAL_SEED,
    LABELS,
    Example,
    generate,
    paper_objects,
    sample_context,
)

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
BATCH = 16
THREADS = 2

#: (prompt token ids, answer token id): one row of the answer-token recipes.
AnswerRow = tuple[list[int], int]
#: (token ids, loss mask): one row of the masked language-model loss (mask true = a predicted token).
TokenRow = tuple[list[int], list[bool]]


def deterministic(threads: int = THREADS) -> None:
    """The setup the shipped adapters were trained (and reproduce bitwise) under: CPU fp32, fixed threads."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    random.seed(0)


def add_lora(model, seed: int, lora: dict = LORA):
    """``model`` wrapped in a fresh LoRA (``lora``: peft LoraConfig settings, default ``LORA``); ``seed`` fixes
    the A matrices' init."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))


def fresh_examples(rng: random.Random, n: int, n_boxes: Sequence[int] = (7,)) -> list[Example]:
    """n fresh paper-template contexts with a uniformly drawn queried box; the box count cycles over
    batches of ``BATCH`` (one box count per batch, so a batch shares one prompt length)."""
    pool = paper_objects()
    out = []
    for i in range(n):
        boxes = n_boxes[(i // BATCH) % len(n_boxes)]
        context = sample_context(rng, boxes, pool, LABELS, context_id=i)
        out.append(context.with_query(rng.randrange(boxes)))
    return out


def pad_token_id(tokenizer) -> int:
    """The id right padding uses: the tokenizer's pad token, else end-of-text (padded positions are masked out
    of attention and loss, so which token it is does not matter)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def stack_rows(rows: Sequence[AnswerRow]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack equal-length prompts (a given wording and box count always tokenizes to one length for the
    paper's objects and labels, so no padding is needed) and their answer ids."""
    if len({len(ids) for ids, _ in rows}) != 1:
        raise RuntimeError("a training batch mixes prompt lengths; batches must share one box count")
    return torch.tensor([ids for ids, _ in rows]), torch.tensor([t for _, t in rows])


def last_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    # logits_to_keep=1: the 49k-row vocabulary projection runs at the last position only
    return model(input_ids=input_ids, logits_to_keep=1).logits[:, -1]


def answer_token_loss(model, rows: Sequence[AnswerRow]) -> torch.Tensor:
    input_ids, targets = stack_rows(rows)
    return torch.nn.functional.cross_entropy(last_logits(model, input_ids), targets)


def prompt_answer_rows(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[AnswerRow]:
    """(special prefix + prompt token ids, answer token id) per (prompt, answer) text pair; the answer must be
    exactly one token that the prompt's tokens are a prefix of (else a RuntimeError naming the pair)."""
    encoder = TokenEncoder(tokenizer)
    ids = encoder.encode([p for p, _ in pairs] + [p + t for p, t in pairs])
    out = []
    for i in range(len(pairs)):
        prompt, whole = ids[i], ids[len(pairs) + i]
        if whole[: len(prompt)] != prompt or len(whole) != len(prompt) + 1:
            raise RuntimeError(f"answer is not one token after the prompt: {pairs[i]!r}")
        out.append((encoder.prefix_ids + prompt, whole[-1]))
    return out


def next_token_logprobs(model, prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Log-probabilities (batch x vocabulary) of the token after each prompt; prompts of any lengths (right
    padding, so a prompt's own positions never see a pad). The vocabulary projection runs only from the
    shortest prompt's last position on."""
    lengths = torch.tensor([len(ids) for ids in prompts])
    width, shortest = int(lengths.max()), int(lengths.min())
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, : len(ids)] = torch.tensor(list(ids))
        attention[i, : len(ids)] = 1
    logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=width - shortest + 1).logits
    # logits[:, j] is at position shortest - 1 + j; a prompt of length L ends at position L - 1
    last = logits[torch.arange(len(prompts)), lengths - shortest]
    return torch.log_softmax(last.float(), dim=-1)


def padded_answer_token_loss(model, rows: Sequence[AnswerRow], pad_id: int) -> torch.Tensor:
    """``answer_token_loss`` for prompts of different lengths (right-padded)."""
    logprobs = next_token_logprobs(model, [ids for ids, _ in rows], pad_id)
    return -logprobs[torch.arange(len(rows)), torch.tensor([t for _, t in rows])].mean()


def masked_token_loss(model, rows: Sequence[TokenRow], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy of the masked tokens, each predicted from the tokens before it; right padding.
    The vocabulary projection runs only from the earliest predicted token's predecessor on."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    predicted = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, mask) in enumerate(rows):
        if len(mask) != len(ids) or mask[0]:
            raise RuntimeError("a loss mask must match its tokens and cannot mark the first token")
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        predicted[i, : len(ids)] = torch.tensor(mask)
    first = int(predicted.int().argmax(1).min())  # earliest predicted token in the batch
    logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=width - first + 1).logits
    # logits[:, j] is at position first - 1 + j and predicts token first + j
    scores, targets, keep = logits[:, :-1], input_ids[:, first:], predicted[:, first:]
    return torch.nn.functional.cross_entropy(scores[keep], targets[keep])


def run_steps(model, batches: Sequence, loss_fn: Callable, lr: float, name: str, log=print,
              after_step: Callable[[int, dict], None] | None = None) -> tuple[list[dict], float]:
    """One AdamW step (torch defaults, constant lr) per batch on the model's trainable parameters;
    ``loss_fn(model, batch)``. Returns the per-step log and the seconds spent."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    history = []
    t0 = time.perf_counter()
    for step, batch in enumerate(batches):
        model.train()
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        entry = {"step": step + 1, "loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - t0, 1)}
        history.append(entry)
        if after_step is not None:
            after_step(step + 1, entry)
        log(f"[{name}] step {step + 1}/{len(batches)} loss {loss.item():.4f} ({entry['seconds']} s)")
    return history, time.perf_counter() - t0


def save_adapter(peft_model, directory: Path, base_ref: str, dtype: torch.dtype = torch.float32) -> None:
    """A PEFT adapter directory whose ``base_model_name_or_path`` is the registry alias of its base;
    ``dtype`` float16 halves the file (the loader casts it back to the model's dtype)."""
    directory.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config["default"].base_model_name_or_path = base_ref
    if dtype == torch.float32:
        peft_model.save_pretrained(str(directory))  # safetensors
    else:  # peft picks the adapter's tensors out of the model's full-named state dict
        state = {k: v.detach().to(dtype) for k, v in peft_model.state_dict().items() if "lora_" in k}
        peft_model.save_pretrained(str(directory), state_dict=state)
    (directory / "README.md").unlink(missing_ok=True)  # peft's empty template card; the model card says it all


def compare_adapters(a: Path, b: Path) -> float:
    """Largest absolute difference between two adapters' tensors (0.0 = bitwise identical)."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if ta.keys() != tb.keys():
        return float("inf")
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def environment() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(), "python": platform.python_version()}


# ---------------------------------------------------------------------------------- model card


def card_results(refs: Sequence[str], boxes: Sequence[int], test_subset: int, path: Path | None = None,
                 threads: int = THREADS, log=print) -> dict:
    """Canonical accuracy (n=500 per box count) of each model, plus the number correct among the
    first ``test_subset`` 7-box items (what a test re-checks). Each box count's record keeps its items'
    outcomes in order (``correct``: a string of 0/1), for paired comparisons of two models on the same items.
    With ``path``, results are merged into that JSON file after every box count, and entries already there are
    kept (resume)."""
    torch.set_num_threads(threads)
    results = json.loads(path.read_text()) if path is not None and path.exists() else {}
    for ref in refs:
        row = results.setdefault(ref, {})
        todo = [n for n in boxes if str(n) not in row]
        if not todo:
            continue
        t0 = time.perf_counter()
        loaded = models.load(ref)
        row["load_seconds"] = round(time.perf_counter() - t0, 1)
        for n_boxes in todo:
            examples = generate(n_boxes, CANONICAL_N, seed=CANONICAL_SEED)
            # The 7-box set is scored in two parts, the test's subset first (so it is on file early);
            # prompts are scored independently, so the parts add up to the whole set's result.
            split = test_subset if n_boxes == 7 else 0
            subset_key = f"7_first{test_subset}"
            t0 = time.perf_counter()
            if split and subset_key not in row:
                res = evaluate(loaded.model, loaded.tokenizer, examples[:split], batch_size=25, progress=False)
                row[subset_key] = res.ci.k
                row[f"{subset_key}_correct"] = correct_flags(res)
                row[f"{subset_key}_seconds"] = round(time.perf_counter() - t0, 1)
                log(f"[{ref}] 7 boxes, first {split}: {res.ci.k}/{split}")
                save_results(results, path)
            res = evaluate(loaded.model, loaded.tokenizer, examples[split:], batch_size=25, progress=False)
            row[str(n_boxes)] = {**accuracy_record(res.ci.k + (row[subset_key] if split else 0), len(examples)),
                                 "seconds": round(time.perf_counter() - t0, 1)}
            # the subset's outcomes (absent when an older file's subset is resumed) join the rest's
            head = row.pop(f"{subset_key}_correct", None) if split else ""
            if head is not None:
                row[str(n_boxes)]["correct"] = head + correct_flags(res)
            log(f"[{ref}] {n_boxes} boxes: {row[str(n_boxes)]}")
            save_results(results, path)
    return results


def correct_flags(result) -> str:
    """An AccuracyResult's per-item outcomes as a string of 0/1, in item order (500 characters per box count)."""
    return "".join("1" if item.correct else "0" for item in result.items)


def save_results(results: dict, path: Path | None) -> None:
    if path is not None:
        atomic_write_json(path, results)


def accuracy_record(k: int, n: int) -> dict:
    ci = proportion_ci(k, n)
    return {"accuracy": round(ci.value, 4), "k": k, "n": n, "ci95": [round(ci.low, 4), round(ci.high, 4)]}


# ---------------------------------------------------------------------------------------------
# The recipes' command lines (``python -m etbench.training.tiny`` / ``.zoo``)
# ---------------------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """The training CLIs' parser: a usage error is one line, ``PROG: error: ...`` and exit 2, as etbench's own
    commands fail (argparse prints its whole usage block first, eight lines for ``training.tiny``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def box_counts(text: str) -> list[int]:
    """argparse type of ``--boxes``: comma-separated box counts 2..26 (``x,y`` was a ValueError traceback)."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated box counts such as 3,5,7, got {text!r}") from None
    if not counts or any(not 2 <= k <= 26 for k in counts):
        raise argparse.ArgumentTypeError(f"box counts must be between 2 and 26, got {text!r}")
    return counts


def thread_count(text: str) -> int:
    """argparse type of ``--threads``: 1..1024."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"expected a number of threads from 1 to 1024, got {text!r}")
    return n


def check_out(parser, out: Path) -> None:
    """``--out`` can hold the adapter directories, checked before anything trains (a file there was found only
    when the first adapter was saved, after its training)."""
    try:
        check_output_dir(out, "--out")
    except Exception as err:  # noqa: BLE001 - EtbenchError: the one line argparse prints
        parser.error(str(err))


def monitor_every(text: str) -> int:
    """argparse type of ``--monitor-every``: 0 (off) or a positive number of steps."""
    try:
        k = int(text)
    except ValueError:
        k = -1
    if not 0 <= k <= 1_000_000:
        raise argparse.ArgumentTypeError(f"expected 0 (off) or a number of steps, got {text!r}")
    return k
