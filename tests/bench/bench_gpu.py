"""GPU check (issue #15; prints figures, not a test): every scoring stage on a Llama-7B-shaped model.

Builds a LlamaForCausalLM with Llama-7B's shape (32 layers x 32 heads, hidden 4096, MLP 11008, vocab
32000) and random weights directly on the device, in bf16 on CUDA (no download, no weights on disk),
runs each stage of ``etbench score`` at a small n, and writes per-stage wall time, peak GPU memory and
a linear extrapolation to ``--preset paper`` into ``<out>/bench_gpu.json`` (also printed).

Then two correctness checks that need real devices:
* split: a small Llama dispatched with accelerate over two devices (first half of the layers on
  cuda:0, second half on cuda:1 when there are two GPUs, else on the CPU; in the CPU smoke test: CPU +
  disk offload, weights on ``meta``) runs fast discovery, prefix reuse (a patched run from a stored KV
  cache against the whole prompt), faithfulness, DCM and CMAP; its numbers are compared with the same
  model on one device, and each check's wall time and peak GPU memory are recorded;
* grads: no parameter of any model holds ``.grad`` afterwards (they all ``requires_grad``, as
  ``from_pretrained`` leaves them).

The random model is at chance, so the *numbers* mean nothing; the times, memory and "no device error"
are what this measures. The fine-tuned side is the same model object (CMAP on ft == base costs the
same as on a real pair; a second 7B copy would only add 13.5 GB).

    python tests/bench/bench_gpu.py --out /tmp/bench                 # CUDA: llama7b shape, bf16
    python tests/bench/bench_gpu.py --out /tmp/bench --device cpu    # CPU smoke test of the script (tiny shape)

Without CUDA and without ``--device cpu`` it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmark"))  # run from a checkout without install

SHAPES = {
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                    num_hidden_layers=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                 num_hidden_layers=2, vocab_size=None),  # vocab = the toy tokenizer's
}
# ``--preset paper`` sizes (etbench score.PRESETS["paper"] and dcm.PRESETS["paper"]); read from the
# package when it has them, these are the fallbacks
PAPER = dict(accuracy_n=500, accuracy_boxes=3, discovery_n=300, minimality_n=100, faithfulness_n=500, mean_n=500,
             random_draws=10, completeness_draws=10, dcm_steps=64, dcm_seeds=3, semantics_n=500, semantics_repeats=10,
             cmap_n=500, batch_size=16)
# the paper's candidate circuit sizes (Llama-7B): minimality "pairs" evaluates ~|g|^2/2 + 3|g| sub-circuits per group
PAPER_CANDIDATES = (58, 10, 25, 5)


#: names that differ between the flat layout and the layered one
_RENAMED = {("etbench.metrics.dcm", "preset"): "dcm_preset", ("etbench.scoring.presets", "PRESETS"): "SCORE_PRESETS"}


def _get(name: str, *modules: str):
    """``name`` from the first of ``modules`` that has it (the package moved to a layered layout)."""
    for mod in modules:
        try:
            return getattr(importlib.import_module(mod), _RENAMED.get((mod, name), name))
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"{name} not found in {modules}")


def _module(*names: str):
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"none of {names}")


def _paper_sizes() -> dict:
    sizes = dict(PAPER)
    try:
        presets = _get("PRESETS", "etbench.scoring.presets", "etbench.score")
        dcm_preset = _get("preset", "etbench.metrics.dcm", "etbench.dcm")
        p, d = presets["paper"], dcm_preset("paper")
        sizes.update(accuracy_n=p.accuracy_n, accuracy_boxes=len(p.accuracy_boxes), discovery_n=p.discovery_n,
                     minimality_n=p.minimality_n, faithfulness_n=p.faithfulness_n, mean_n=p.mean_n,
                     random_draws=p.random_draws, completeness_draws=p.completeness_draws, dcm_steps=d.steps,
                     dcm_seeds=len(p.dcm_seeds), semantics_n=d.semantics_n, semantics_repeats=d.semantics_repeats,
                     cmap_n=p.cmap_n, batch_size=p.batch_size)
    except Exception as err:  # noqa: BLE001 - fall back to the recorded sizes, and say so
        sizes["note"] = f"paper sizes from this script's table ({type(err).__name__}: {err})"
    return sizes


class Meter:
    """Wall time and peak device memory of one block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_gb = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self.peak_gb = None
        self.s = time.perf_counter() - self.t0


def build_model(shape: str, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0, layers: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(SHAPES[shape])
    cfg["vocab_size"] = cfg["vocab_size"] or vocab
    if layers:
        cfg["num_hidden_layers"] = layers
    config = LlamaConfig(**cfg, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # why: initialise in the target dtype, never a 27 GB fp32 copy first
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def small_circuit(n_layers: int, n_heads: int):
    """The paper's Llama-7B circuit on the 7B shape; a fixed spread of heads otherwise."""
    Circuit = _get("Circuit", "etbench.schema.circuit", "etbench.circuits")
    Node = _get("Node", "etbench.schema.circuit", "etbench.circuits")
    if (n_layers, n_heads) == (32, 32):
        return _get("paper_circuit", "etbench.schema.circuit", "etbench.circuits")("llama7b")
    groups = ("value_fetcher", "position_transmitter", "position_detector", "structure_reader")
    nodes = {g: [Node(g, (i + j) % n_layers, (3 * i + j) % n_heads) for j in range(2)] for i, g in enumerate(groups)}
    return Circuit(nodes, model="bench", n_layers=n_layers, n_heads=n_heads)


def run_stages(model, tok, n: int, bs: int, device: torch.device, paper: dict, out: dict, exact_senders: int) -> None:
    """Each stage at ``n`` items; ``out["stages"][name] = {s, peak_gb, paper_s, how}``."""
    data = _module("etbench.task.prompts", "etbench.data")
    usable_pool = _get("usable_pool", "etbench.task.layout", "etbench.layout")
    layouts = _get("layouts", "etbench.task.layout", "etbench.layout")
    pad_id_of = _get("pad_id_of", "etbench.task.layout", "etbench.layout")
    head_map = _get("head_map", "etbench.mech.heads", "etbench.heads")
    evaluate = _get("evaluate", "etbench.metrics.accuracy", "etbench.accuracy")
    discover = _get("discover", "etbench.metrics.discovery", "etbench.circuits")
    path_patching_scores = _get("path_patching_scores", "etbench.metrics.discovery", "etbench.circuits")
    encode_pairs = _get("encode_pairs", "etbench.task.counterfactuals", "etbench.counterfactuals")
    noise_pairs = _get("noise_pairs", "etbench.task.counterfactuals", "etbench.counterfactuals")
    mean_activations = _get("mean_activations", "etbench.metrics.ablation", "etbench.faithfulness")
    AblationRunner = _get("AblationRunner", "etbench.metrics.ablation", "etbench.faithfulness")
    evaluate_circuit = _get("evaluate_circuit", "etbench.metrics.faithfulness", "etbench.faithfulness")
    dcm_preset = _get("preset", "etbench.metrics.dcm", "etbench.dcm")
    train_masks = _get("train_masks", "etbench.metrics.dcm", "etbench.dcm")
    semantics_check = _get("semantics_check", "etbench.metrics.dcm", "etbench.dcm")
    run_cmap = _get("run_cmap", "etbench.metrics.cmap", "etbench.cmap")
    VARIANTS = _get("VARIANTS", "etbench.metrics.cmap", "etbench.cmap")

    hm = head_map(model)
    spec = hm.spec
    circuit = small_circuit(spec.n_layers, spec.n_heads)
    pool, labels = usable_pool(tok, 7)
    examples = data.generate(n_boxes=7, n=n, seed=0, objects=pool, labels=labels)
    stages = out["stages"]
    meter = Meter(device)

    def record(name: str, fn, paper_s, how: str):
        try:
            with meter:
                value = fn()
            stages[name] = {"s": round(meter.s, 3), "peak_gb": None if meter.peak_gb is None else round(meter.peak_gb, 2),
                            "paper_s": None if paper_s is None else round(paper_s(meter.s), 1), "how": how}
            print(f"{name:>22}: {meter.s:8.2f} s" + (f", peak {meter.peak_gb:6.1f} GB" if meter.peak_gb else "")
                  + (f"; paper ~{stages[name]['paper_s'] / 60:.1f} min" if paper_s else ""), flush=True)
            return value
        except Exception as err:  # noqa: BLE001 - one failing stage must not hide the others' figures
            stages[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            print(f"{name:>22}: FAILED {type(err).__name__}: {err}", flush=True)
            return None

    lays = layouts(examples, tok)
    out["prompt_tokens"] = lays[0].length
    # one plain forward of a batch (the unit every other figure is made of)
    ids = torch.tensor([lay.input_ids for lay in lays[:bs]], device=device)
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)  # warm-up (kernels, allocator)
    record("forward_batch", lambda: torch.no_grad()(model)(input_ids=ids, logits_to_keep=1), None,
           f"one forward, batch {len(ids)} x {ids.shape[1]} tokens")

    ratio = lambda k: (lambda s: s * k)  # noqa: E731
    record("accuracy", lambda: evaluate(model, tok, examples, bs, False), ratio(
        paper["accuracy_n"] * paper["accuracy_boxes"] * 2 / n),
        "n items at 7 boxes; paper: accuracy_n x box counts x 2 models (3/5-box prompts are shorter: an upper bound)")

    encoded = encode_pairs(noise_pairs(examples[:bs], 0, pool, labels), tok)
    senders = [(layer, head) for layer in range(spec.n_layers) for head in range(spec.n_heads)][:exact_senders]
    total_heads = spec.n_layers * spec.n_heads
    batches = math.ceil(paper["discovery_n"] / paper["batch_size"])
    # receivers in the last layer, so no sender is skipped (an upper bound: the real search skips
    # senders at or above every receiver)
    receivers = [(spec.n_layers - 1, h) for h in range(min(4, spec.n_heads))]
    record("exact_A_per_batch", lambda: path_patching_scores(model, hm, encoded, "value_fetcher", (), senders, bs,
                                                             pad_id_of(tok)),
           ratio(total_heads / len(senders) * batches * 2),
           f"exact path patching, group A, {len(senders)} senders x 1 batch of {len(encoded)}; "
           "paper: x all heads x batches of discovery_n x 2 models")
    record("exact_B_per_batch", lambda: path_patching_scores(model, hm, encoded, "position_transmitter", receivers,
                                                             senders, bs, pad_id_of(tok)),
           ratio(total_heads / len(senders) * batches * 2 * 3),
           f"group B (two passes per sender), {len(senders)} senders; paper: x all heads x batches x 2 models x "
           "3 groups (B, C, D; upper bound)")
    mean = record("mean_activations", lambda: mean_activations(model, tok, hm, 7, n, 0, bs, pool, labels),
                  ratio(paper["mean_n"] / n * 2 * 2), "n prompts; paper: mean_n, 2 models, discovery + scoring")
    if mean is not None:
        runner = record("minimality_setup", lambda: AblationRunner(model, hm, lays, mean, bs), None,
                        "stored all-meaned prefixes of n prompts")
        if runner is not None:
            nodes = [node for g in circuit.groups for node in circuit.groups[g]]
            evaluations = sum(k * k / 2 + 3 * k for k in PAPER_CANDIDATES)
            record("minimality_eval", lambda: [runner.correct(keep=circuit.without([v]).kept()) for v in nodes[:2]],
                   ratio(evaluations / 2 * paper["minimality_n"] / n * 2),
                   f"2 sub-circuit evaluations on n prompts; paper 'pairs': ~{evaluations:.0f} evaluations "
                   f"(candidates {PAPER_CANDIDATES}) x minimality_n x 2 models")
    record("discovery_fast", lambda: discover(model, "fast", tok, n_boxes=7, n=n, batch_size=bs,
                                              minimality_mode="none", mean_n=n),
           ratio(paper["discovery_n"] / n * 2),
           "fast discovery (attribution + exact verification), no minimality; scaled to discovery_n x 2 models "
           "(the paper preset runs exact: see exact_*)")
    basic = record("faithfulness_core", lambda: evaluate_circuit(
        model, circuit, tok, n_boxes=7, n=n, seed=0, mean_n=n, batch_size=bs, random_draws=0,
        completeness_draws=0, curve=False), None, "model + circuit accuracy under mean ablation")
    record("faithfulness_draws", lambda: evaluate_circuit(
        model, circuit, tok, n_boxes=7, n=n, seed=0, mean_n=n, batch_size=bs, random_draws=1,
        completeness_draws=1, curve=True), None, "the same + 1 random draw + 1 completeness draw + curve")
    if basic is not None and "s" in stages.get("faithfulness_draws", {}):
        core, draws = stages["faithfulness_core"]["s"], stages["faithfulness_draws"]["s"]
        per = max(draws - core, 0.0)
        stages["faithfulness_paper_estimate"] = {
            "paper_s": round((2 * core + paper["random_draws"] * per) * paper["faithfulness_n"] / n * 2, 1),
            "how": "(2 circuits x core + random_draws x (draw + completeness + curve)) x faithfulness_n/n x 2 models"}
    dcm_cfg = dcm_preset("paper", n_train=dcm_preset("paper").batch_size * 2, n_val=n, n_test=n, epochs=1, eval_every=1,
                         additional_for=(), semantics_n=n, semantics_repeats=1)
    dcm_res = record("dcm", lambda: train_masks(model, tok, circuit, dcm_cfg), None,
                     f"{dcm_cfg.steps} steps of batch {dcm_cfg.batch_size}, 4 groups x 3 desiderata, val/test {n}")
    if dcm_res is not None:
        per_step = stages["dcm"]["s"] / max(dcm_cfg.steps, 1)
        stages["dcm"]["paper_s"] = round(per_step * paper["dcm_steps"] * paper["dcm_seeds"] * 2, 1)
        stages["dcm"]["how"] += "; paper: (stage time / steps) x paper steps x seeds x 2 models (validation included)"
    selections = {(g, "positional"): list(circuit.heads(g)) for g in circuit.groups if circuit.heads(g)}
    record("semantics", lambda: semantics_check(model, tok, selections, n=n, repeats=1, batch_size=bs),
           ratio(paper["semantics_n"] / n * paper["semantics_repeats"] * 2), "n items x 1 repeat; paper: x repeats x 2")
    heads = {g: list(circuit.heads(g)) for g in circuit.groups if circuit.heads(g)}
    record("cmap", lambda: run_cmap(model, model, tok, heads, examples, variants=VARIANTS, batch_size=bs),
           ratio(paper["cmap_n"] / n), "6 variants, every group + full, n items; paper: cmap_n")
    known = [v["paper_s"] for k, v in stages.items() if v.get("paper_s") is not None
             and k not in ("discovery_fast", "faithfulness_draws", "faithfulness_core")]
    out["paper_total_estimate_h"] = round(sum(known) / 3600, 2)


def split_check(tok, device: torch.device, n: int, out: dict) -> None:
    """A small model over two devices (accelerate) must run every stage and agree with one device."""
    from accelerate import dispatch_model

    discover = _get("discover", "etbench.metrics.discovery", "etbench.circuits")
    evaluate_circuit = _get("evaluate_circuit", "etbench.metrics.faithfulness", "etbench.faithfulness")
    train_masks = _get("train_masks", "etbench.metrics.dcm", "etbench.dcm")
    dcm_preset = _get("preset", "etbench.metrics.dcm", "etbench.dcm")
    run_cmap = _get("run_cmap", "etbench.metrics.cmap", "etbench.cmap")
    data = _module("etbench.task.prompts", "etbench.data")

    PatchRunner = _get("PatchRunner", "etbench.mech.prefix", "etbench.prefix")
    replace = _get("replace", "etbench.mech.interventions", "etbench.interventions")
    layouts = _get("layouts", "etbench.task.layout", "etbench.layout")

    n_layers = 4
    ref = build_model("tiny", len(tok), torch.float32, device, seed=5, layers=n_layers)
    split = build_model("tiny", len(tok), torch.float32, torch.device("cpu"), seed=5, layers=n_layers)
    split.load_state_dict({k: v.cpu() for k, v in ref.state_dict().items()})
    half = n_layers // 2
    offload = None
    first = device.index or 0
    gpus = [first]
    if device.type == "cuda":
        second = (first + 1) if torch.cuda.device_count() > first + 1 else "cpu"
        if second != "cpu":
            gpus.append(second)
        where = {i: first if i < half else second for i in range(n_layers)}
        dm = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": second,
              "lm_head": second, **{f"model.layers.{i}": d for i, d in where.items()}}
        desc = (f"layers 0-{half - 1} on cuda:{first}, {half}-{n_layers - 1} on "
                + (f"cuda:{second}" if second != "cpu" else "the CPU (executed there)"))
    else:
        offload = tempfile.mkdtemp(prefix="etbench-offload-")
        dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
              **{f"model.layers.{i}": "cpu" if i < half else "disk" for i in range(n_layers)}}
        desc = f"no CUDA: layers {half}-{n_layers - 1} offloaded to disk (weights on meta), executed on the CPU"
    split = dispatch_model(split, dm, main_device="cpu", offload_dir=offload)
    circuit = small_circuit(n_layers, SHAPES["tiny"]["num_attention_heads"])
    examples = data.generate(n_boxes=3, n=n, seed=0)
    cfg = dcm_preset("quick", n_train=8, n_val=8, n_test=8, epochs=1, batch_size=8, eval_every=1)
    result = {"how": desc, "checks": {}}

    def both(name, fn, compare):
        try:
            a = fn(ref)
            if device.type == "cuda":
                for g in gpus:
                    torch.cuda.synchronize(g)
                    torch.cuda.reset_peak_memory_stats(g)
            t0 = time.perf_counter()
            b = fn(split)
            peak = None
            if device.type == "cuda":
                for g in gpus:
                    torch.cuda.synchronize(g)
                peak = {f"cuda:{g}": round(torch.cuda.max_memory_allocated(g) / 2**30, 3) for g in gpus}
            diff = compare(a, b)
            result["checks"][name] = {"ok": diff <= 1e-4, "max_abs_diff": diff, "split_s": round(time.perf_counter() - t0, 3),
                                      "split_peak_gb": peak}
        except Exception as err:  # noqa: BLE001
            result["checks"][name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                      "traceback": traceback.format_exc()}
        print(f"{'split ' + name:>22}: {result['checks'][name]}"[:300], flush=True)

    def scores_diff(a, b):
        return max(abs(x - y) for g in a.searches for ra, rb in zip(a.searches[g].scores, b.searches[g].scores)
                   for x, y in zip(ra, rb))

    both("discovery_fast", lambda m: discover(m, "fast", tok, n_boxes=3, n=n, batch_size=n, minimality_mode="none",
                                              mean_n=n), scores_diff)
    lays = layouts(examples, tok)
    prompt_ids = torch.tensor([lay.input_ids for lay in lays], dtype=torch.long)
    last = prompt_ids.shape[1] - 1

    def prefix_logits(m):
        """A patched last-token run from the stored KV cache (each layer's cache on its own device) and
        the same run over whole prompts: (reused, whole)."""
        source = torch.zeros(1, 1, SHAPES["tiny"]["hidden_size"] // SHAPES["tiny"]["num_attention_heads"])
        rows = torch.arange(prompt_ids.shape[0])

        def edits(sub, shift):
            return [replace(n_layers - 1, "z", source, last - shift, heads=[0])]

        outs = []
        for reuse in (True, False):
            runner = PatchRunner(m, prompt_ids, batch_size=n, reuse_prefix=reuse)
            if reuse and not runner.reuse_prefix:
                raise RuntimeError("prefix reuse fell back to whole prompts (no per-layer KV cache)")
            with torch.no_grad():
                outs.append(runner.logits(rows, runner.kv(rows), last, edits).cpu())
        return outs

    both("prefix_reuse", prefix_logits,
         lambda a, b: max(float((a[0] - b[0]).abs().max()), float((b[0] - b[1]).abs().max()),
                          float((a[0] - a[1]).abs().max())))
    both("faithfulness", lambda m: evaluate_circuit(m, circuit, tok, n_boxes=3, n=n, mean_n=n, batch_size=n,
                                                    random_draws=1, completeness_draws=1),
         lambda a, b: float(a.circuit_correct != b.circuit_correct) + abs(a.faithfulness - b.faithfulness)
         if a.faithfulness == a.faithfulness else float(a.circuit_correct != b.circuit_correct))
    both("dcm", lambda m: train_masks(m, tok, circuit, cfg),
         lambda a, b: max(abs(x - y) for ma, mb in zip(a.masks, b.masks) for x, y in zip(ma.mask, mb.mask)))
    heads = {g: list(circuit.heads(g)) for g in circuit.groups if circuit.heads(g)}
    both("cmap", lambda m: run_cmap(m, m, tok, heads, examples, variants=("output", "qkv"), batch_size=n),
         lambda a, b: float([r.predicted for r in a.runs] != [r.predicted for r in b.runs]))
    result["grads_clean"] = all(p.grad is None for m in (ref, split) for p in m.parameters())
    out["split"] = result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for bench_gpu.json")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: llama7b on CUDA, tiny else")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--n", type=int, default=16, help="items per stage (one batch)")
    parser.add_argument("--exact-senders", type=int, default=32, help="senders timed for exact path patching")
    parser.add_argument("--skip-split", action="store_true")
    args = parser.parse_args()
    if args.device is None and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False): this script measures GPU "
              "time and memory; --device cpu runs it as a CPU smoke test", file=sys.stderr)
        sys.exit(2)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or "cuda")
    shape = args.shape or ("llama7b" if device.type == "cuda" else "tiny")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    word_level_tokenizer = _get("word_level_tokenizer", "etbench.models.toy", "etbench.toy")
    tok = word_level_tokenizer()
    out: dict = {"schema_version": 1, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
                 "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                 "torch": torch.__version__, "python": platform.python_version(), "n": args.n, "stages": {}}
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    paper = _paper_sizes()
    out["paper_sizes"] = paper
    print(f"bench_gpu: {shape} in {out['dtype']} on {device} ({out['gpu'] or platform.processor() or 'cpu'}), n={args.n}",
          flush=True)
    meter = Meter(device)
    with meter:
        model = build_model(shape, len(tok), dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    out["model"] = {"parameters": n_params, "weights_gb": round(n_params * model.dtype.itemsize / 2**30, 2),
                    "build_s": round(meter.s, 2), "peak_gb": meter.peak_gb and round(meter.peak_gb, 2)}
    print(f"model: {n_params / 1e9:.2f} B parameters, {out['model']['weights_gb']} GB weights, built in {meter.s:.1f} s",
          flush=True)
    t0 = time.perf_counter()
    run_stages(model, tok, args.n, min(16, args.n), device, paper, out, args.exact_senders)
    out["stages_wall_s"] = round(time.perf_counter() - t0, 1)
    out["grads_clean"] = all(p.grad is None for p in model.parameters())
    print(f"no parameter holds .grad: {out['grads_clean']}; paper preset estimate {out['paper_total_estimate_h']} h "
          "(sum of the stages' linear extrapolations)", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_split:
        split_check(tok, device, 8, out)
    out["ok"] = out["grads_clean"] and all("error" not in s for s in out["stages"].values()) and (
        args.skip_split or (all(c.get("ok") for c in out["split"]["checks"].values()) and out["split"]["grads_clean"]))
    path = out_dir / "bench_gpu.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1, default=str) + "\n")
    tmp.replace(path)
    print(f"wrote {path}; ok: {out['ok']}", flush=True)
    sys.exit(0 if out["ok"] else 1)


if __name__ == "__main__":
    main()
