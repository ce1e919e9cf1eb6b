"""Export: any model reference -> a plain transformers directory (config, safetensors, tokenizer) that
``AutoModelForCausalLM.from_pretrained`` and ``lm_eval --model hf --model_args pretrained=DIR`` load with no
etbench code: adapters merged, a GGUF dequantised, a planted model's kept ablation kept in its weights.

The directory is written as a hidden sibling, reloaded and checked against the model in memory (same
logits on the benchmark's prompts, same tokens), then renamed into place; an existing directory is replaced
only when every file in it is listed in the manifest an earlier export wrote there (core.io's ownership
rule), so a user's directory is never overwritten."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from etbench.core.errors import EtbenchError, one_line
from etbench.core.io import Writer, atomic_write_json, check_output_dir, refuse_foreign_files, temporary_name
from etbench.core.progress import quiet_loading
from etbench.models.load import check_dtype, load
from etbench.models.registry import RegistryEntry
from etbench.task import prompts

EXPORT_WRITER = Writer("etbench models export", ".etbench-export-manifest.json")
#: Largest difference of logits allowed between the model in memory and the reloaded export, per dtype
#: (the same weights give the same logits up to float summation order). float32: tiny-base's reload differed by
#: 0.0024 once in a full test run on a busy 2-core machine (logits up to 30; 0 when rerun alone), so 1e-3 failed
#: correct exports; an export that computes something else differs by order 1 (tests/model/test_export.py).
LOGIT_TOLERANCE = {"float32": 1e-2, "bfloat16": 0.1, "float16": 0.05}


def check_export_dir(directory: str | os.PathLike) -> Path:
    """``directory`` can receive an export: new, empty, or holding only what an earlier export wrote.
    Checked before any model loads; everything else there is refused (one ``EtbenchError``)."""
    directory = check_output_dir(directory, "DIR")
    if directory.is_dir():
        entries = {p.name for p in directory.iterdir()} - {EXPORT_WRITER.manifest}
        refuse_foreign_files(directory, dict.fromkeys(sorted(entries)), EXPORT_WRITER)
    return directory


def export_model(ref: str, directory: str | os.PathLike, *, dtype: str = "float32",
                 entries: Mapping[str, RegistryEntry] | None = None,
                 report: Callable[[str], None] | None = None) -> Path:
    """Write ``ref`` (alias, hub id, directory, .gguf, adapter) as a plain transformers directory at
    ``directory`` in ``dtype`` and return its path. Fails in one line, with nothing written, when the
    directory holds files an export did not write, the model is not available, or its weights cannot be
    expressed as a plain directory of its architecture. ``report(line)`` gets the load's lines and the
    export's steps."""
    dtype = check_dtype(dtype)
    directory = check_export_dir(directory)
    report = report or (lambda line: None)
    loaded = load(ref, dtype=dtype, device="cpu", entries=entries, report=report)
    tmp = temporary_name(directory)
    try:
        with quiet_loading():  # peft's merge warns as its load does
            model = plain_model(loaded.model)
            tmp.mkdir(parents=True)
            model.save_pretrained(tmp, safe_serialization=True)
            loaded.tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():  # safetensors writes its file private; an export is an ordinary directory
            path.chmod(0o644)
        report(f"checking the export of {ref}: reloading it, comparing tokens and logits")
        gap = check_reloads_same(model, loaded.tokenizer, tmp, dtype, ref)
        report(f"checked: the same tokens, logits equal to within {gap:.2g} (allowed {LOGIT_TOLERANCE[dtype]})")
        files = sorted(p.name for p in tmp.iterdir())
        atomic_write_json(tmp / EXPORT_WRITER.manifest, {"generated_by": EXPORT_WRITER.command, "files": files,
                                                         "model": ref, "dtype": dtype})
        _put_in_place(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def plain_model(model):
    """``model`` as a plain transformers model whose state dict its own config describes: a PEFT model
    merged and unloaded, and output-projection biases that a kept ablation added (models.kept_ablation)
    declared in the config (``attention_bias``) with zero biases for the other projections that then
    expect one. Anything else a fresh model of the config would not hold is refused."""
    import torch
    from transformers import AutoModelForCausalLM

    if hasattr(model, "merge_and_unload"):  # a PeftModel: the adapter into the weights
        model = model.merge_and_unload()
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    have = set(model.state_dict())

    def expected() -> set[str]:
        with torch.device("meta"):
            return set(AutoModelForCausalLM.from_config(config).state_dict())

    wanted = expected()
    if have - wanted and getattr(text, "attention_bias", None) is False:
        text.attention_bias = True  # the kept ablation's o_proj bias: declare attention biases
        wanted = expected()
    extra = sorted(have - wanted)
    if extra:
        raise EtbenchError(f"{type(model).__name__}: weights its config cannot describe ({', '.join(extra[:3])}"
                           f"{', ...' if len(extra) > 3 else ''}); it cannot be exported as a plain directory")
    with torch.no_grad():
        for name in sorted(wanted - have):
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            if leaf != "bias" or not isinstance(module, torch.nn.Linear):
                raise EtbenchError(f"{type(model).__name__}: its config expects {name}, which the model lacks")
            module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                                         device=module.weight.device), requires_grad=False)
    return model


def check_reloads_same(model, tokenizer, directory: Path, dtype: str, name: str) -> float:
    """The export in ``directory`` loads with transformers alone and computes what ``model`` computes:
    the same tokens for the benchmark's prompts and the same logits within ``LOGIT_TOLERANCE``. Returns the
    largest difference of logits found."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = [example.prompt for example in prompts.generate(n_boxes=7, n=2, seed=0)]
    try:
        with quiet_loading():
            reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype),
                                                            local_files_only=True).eval()
            reloaded_tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise EtbenchError(f"{name}: the exported directory does not load with transformers ({one_line(err)})") \
            from None
    largest = 0.0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        if not torch.equal(reloaded_tokenizer(text, return_tensors="pt").input_ids, ids):
            raise EtbenchError(f"{name}: the exported tokenizer splits the benchmark's prompts differently")
        with torch.no_grad():
            ours, theirs = model(ids).logits.float(), reloaded(ids).logits.float()
        gap = (ours - theirs).abs().max().item()
        largest = max(largest, gap)
        if gap > LOGIT_TOLERANCE[dtype]:
            raise EtbenchError(f"{name}: the exported directory's logits differ from the model's by up to {gap:.3g} "
                               f"(allowed {LOGIT_TOLERANCE[dtype]}); not exported")
    return largest


def _put_in_place(tmp: Path, directory: Path) -> None:
    """Rename the finished export to ``directory``: a new or empty one directly, an earlier export's by
    swapping (the old one moved aside, then removed), after checking again that nothing foreign appeared."""
    check_export_dir(directory)
    if not directory.exists():
        os.rename(tmp, directory)
        return
    if not any(directory.iterdir()):
        directory.rmdir()
        os.rename(tmp, directory)
        return
    old = temporary_name(directory, ".bak")
    os.rename(directory, old)
    try:
        os.rename(tmp, directory)
    except OSError:
        os.rename(old, directory)  # put the earlier export back
        raise
    shutil.rmtree(old, ignore_errors=True)
