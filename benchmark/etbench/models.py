"""Where model weights come from: a reference (alias, hub id, local directory, ...) → model + tokenizer.

Nothing else in etbench knows how weights are found or loaded. A reference is one of

* an alias from ``assets/registry.yaml`` (``etbench models list``),
* a hub id (``owner/name``), loaded from the local HF cache when it is there,
* a local model directory (``config.json``) or PEFT adapter directory (``adapter_config.json``),
* a ``.gguf`` file, dequantised once and cached as float32 safetensors + tokenizer under
  ``$ETBENCH_CACHE/gguf/<name>-<sha256 prefix>/`` (default ``~/.cache/etbench``),
* ``asset:<path>``: a directory shipped inside the package (``etbench/assets/<path>``).

Availability is decided *before* any ``from_pretrained`` call, from the local cache and a short
reachability probe, so a missing model fails in well under a second with one line saying how to get
it, instead of hanging on a closed network.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import EtbenchError
from .fileio import atomic_write_json

DTYPES = ("float32", "bfloat16", "float16")
KINDS = ("hub", "gguf", "peft")
ASSETS_DIR = Path(__file__).parent / "assets"
REGISTRY_PATH = ASSETS_DIR / "registry.yaml"
ASSET_PREFIX = "asset:"
GGUF_MANIFEST = "etbench_gguf.json"
_TRUE = {"1", "on", "yes", "true"}


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RegistryEntry:
    """One alias of ``registry.yaml`` (the schema is documented at the top of that file)."""

    alias: str
    kind: str
    description: str
    repo: str | None = None
    revision: str | None = None
    package: str | None = None
    file: str | None = None
    assemble: bool = False
    base: str | None = None
    adapter: str | None = None
    merge: bool = False
    tokenizer: str | None = None
    install: str | None = None
    notes: str = ""


_REQUIRED = {"hub": ("repo",), "gguf": ("package", "file"), "peft": ("base", "adapter")}


def parse_registry(data: dict, origin: str = "registry") -> dict[str, RegistryEntry]:
    """Validate a parsed registry document; errors name the alias and the bad key."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise EtbenchError(f"{origin}: expected a mapping with a 'models' mapping")
    if data.get("schema_version") != 1:
        raise EtbenchError(f"{origin}: unsupported schema_version {data.get('schema_version')!r} (expected 1)")
    known = {f.name for f in fields(RegistryEntry)} - {"alias"}
    entries = {}
    for alias, raw in data["models"].items():
        if not isinstance(raw, dict):
            raise EtbenchError(f"{origin}: entry {alias!r} must be a mapping")
        unknown = sorted(set(raw) - known)
        if unknown:
            raise EtbenchError(f"{origin}: entry {alias!r} has unknown keys {unknown}")
        kind = raw.get("kind")
        if kind not in KINDS:
            raise EtbenchError(f"{origin}: entry {alias!r} has kind {kind!r}, expected one of {', '.join(KINDS)}")
        missing = [key for key in ("description", *_REQUIRED[kind]) if not raw.get(key)]
        if missing:
            raise EtbenchError(f"{origin}: entry {alias!r} (kind {kind}) is missing {', '.join(missing)}")
        entries[str(alias)] = RegistryEntry(alias=str(alias), **raw)
    for alias in entries:  # a peft base chain must end in a non-peft model
        seen = [alias]
        while entries.get(seen[-1]) is not None and entries[seen[-1]].kind == "peft":
            seen.append(entries[seen[-1]].base)
            if seen[-1] in seen[:-1]:
                raise EtbenchError(f"{origin}: entry {alias!r} has a base cycle: {' -> '.join(seen)}")
    return entries


@lru_cache(maxsize=None)
def registry() -> dict[str, RegistryEntry]:
    """The aliases shipped with etbench (read once per process)."""
    import yaml

    with open(REGISTRY_PATH, encoding="utf-8") as handle:
        return parse_registry(yaml.safe_load(handle), origin=str(REGISTRY_PATH))


# ---------------------------------------------------------------------------------------------
# Resolution: reference → ModelSpec (no loading, no network)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """What a reference points at, before anything is loaded.

    ``kind`` is ``hub`` (``location`` = hub id), ``directory`` (a saved model), ``gguf``
    (``location`` = the .gguf path; may not exist yet when it is assembled on demand) or ``peft``
    (``location`` = adapter hub id or directory, ``base`` = the base model's spec).
    """

    ref: str
    kind: str
    location: str
    alias: str | None = None
    base: ModelSpec | None = None
    merge: bool = False
    revision: str | None = None
    tokenizer: str | None = None
    install: str | None = None
    entry: RegistryEntry | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """How errors name the model: ``alias (hub id)`` or just the reference."""
        if self.alias and self.kind == "hub":
            return f"{self.alias} ({self.location})"
        return self.alias or self.ref


def _asset_path(ref: str) -> Path:
    relative = ref[len(ASSET_PREFIX):].strip("/")
    path = (ASSETS_DIR / relative).resolve()
    if ASSETS_DIR.resolve() not in path.parents and path != ASSETS_DIR.resolve():
        raise EtbenchError(f"{ref}: asset paths must stay inside {ASSETS_DIR}")
    return path


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~", ASSET_PREFIX)) or ref.endswith(".gguf") or ref.count("/") > 1 \
        or os.sep != "/" and os.sep in ref


def _package_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_location(entry: RegistryEntry) -> str:
    if entry.assemble:
        return str(cache_root() / "gguf-src" / entry.file)
    package_dir = _package_dir(entry.package)
    # A package that is not installed still gets a (non-existent) location, so availability can say so.
    return str((package_dir or Path(f"<{entry.package} not installed>")) / entry.file)


def _spec_from_path(ref: str, path: Path, entries: Mapping[str, RegistryEntry]) -> ModelSpec:
    if path.is_file() and path.suffix == ".gguf":
        return ModelSpec(ref=ref, kind="gguf", location=str(path))
    if (path / "adapter_config.json").is_file():
        base_ref = _adapter_base(path / "adapter_config.json")
        return ModelSpec(ref=ref, kind="peft", location=str(path), base=resolve(base_ref, entries))
    if (path / "config.json").is_file():
        return ModelSpec(ref=ref, kind="directory", location=str(path))
    if path.exists():
        raise EtbenchError(f"{ref}: not a model (no config.json or adapter_config.json in {path}, "
                           "and not a .gguf file)")
    raise EtbenchError(f"{ref}: no such file or directory")


def _adapter_base(config_path: Path) -> str:
    base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise EtbenchError(f"{config_path}: adapter_config.json names no base_model_name_or_path; "
                           "use a registry entry with an explicit base")
    return base


def resolve(ref: str, entries: Mapping[str, RegistryEntry] | None = None) -> ModelSpec:
    """Turn a reference into a ModelSpec. Touches only the local filesystem.

    ``entries`` replaces the shipped registry (tests, or a caller with its own aliases).
    """
    entries = registry() if entries is None else entries
    entry = entries.get(ref)
    if entry is not None:
        return _spec_from_entry(entry, entries)
    if ref.startswith(ASSET_PREFIX):
        return _spec_from_path(ref, _asset_path(ref), entries)
    path = Path(ref).expanduser()
    if path.exists() or _looks_like_path(ref):
        return _spec_from_path(ref, path, entries)
    snapshot = cached_snapshot(ref)
    if snapshot is not None and (snapshot / "adapter_config.json").is_file():
        # A hub adapter repo: its base comes from adapter_config.json, as for an adapter directory.
        base = resolve(_adapter_base(snapshot / "adapter_config.json"), entries)
        return ModelSpec(ref=ref, kind="peft", location=ref, base=base, install=f"hf download {ref}")
    return ModelSpec(ref=ref, kind="hub", location=ref, install=f"hf download {ref}")


def _spec_from_entry(entry: RegistryEntry, entries: Mapping[str, RegistryEntry]) -> ModelSpec:
    common = dict(ref=entry.alias, alias=entry.alias, tokenizer=entry.tokenizer, install=entry.install, entry=entry)
    if entry.kind == "hub":
        return ModelSpec(kind="hub", location=entry.repo, revision=entry.revision, **common)
    if entry.kind == "gguf":
        return ModelSpec(kind="gguf", location=_gguf_location(entry), **common)
    adapter = entry.adapter
    if adapter.startswith(ASSET_PREFIX):
        adapter = str(_asset_path(adapter))
    elif Path(adapter).expanduser().exists():
        adapter = str(Path(adapter).expanduser())
    return ModelSpec(kind="peft", location=adapter, base=resolve(entry.base, entries), merge=bool(entry.merge),
                     **common)


# ---------------------------------------------------------------------------------------------
# Availability (fast: local files, HF cache, a 2-second reachability probe)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Availability:
    ok: bool
    why: str  # one line: where it is, or how to get it


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once at import)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@lru_cache(maxsize=None)
def _hub_reachable_cached(host: str, port: int, timeout: float) -> bool:
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # A thread, because DNS resolution ignores socket timeouts and can hang on a closed network.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` (asked once per process)."""
    if hub_offline():
        return False
    from huggingface_hub import constants

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    return _hub_reachable_cached(url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80),
                                 timeout)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def hf_cache_dir() -> Path:
    """The HF hub cache, from the environment now (huggingface_hub fixes it at import time)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The local HF-cache snapshot of a hub repo when it holds a config and weights, else None."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo, revision=revision, cache_dir=hf_cache_dir(), local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, a malformed id (HFValidationError), ...
        return None
    has_config = (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    has_weights = any(p.name.endswith(_WEIGHT_SUFFIXES) for p in path.iterdir())
    return path if has_config and has_weights else None


def _missing(spec: ModelSpec, what: str) -> Availability:
    how = f"run '{spec.install}'" if spec.install else "see the model's documentation"
    return Availability(False, f"{what}: {how}")


def availability(spec: ModelSpec, allow_download: bool = False) -> Availability:
    """Whether ``spec`` can be loaded now. ``allow_download``: count a reachable hub as available."""
    if spec.kind == "directory":
        return Availability(True, f"local directory {spec.location}")
    if spec.kind == "hub":
        if cached_snapshot(spec.location, spec.revision) is not None:
            return Availability(True, "in the local Hugging Face cache")
        if allow_download and hub_reachable():
            return Availability(True, "will be downloaded from the hub")
        why = "not in the local Hugging Face cache" + (" (HF_HUB_OFFLINE is set)" if hub_offline() else "")
        how = f"run '{spec.install}' where the hub is reachable, or pass a local directory"
        return Availability(False, f"{why}: {how}")
    if spec.kind == "gguf":
        return _gguf_availability(spec)
    base = availability(spec.base, allow_download)
    if not base.ok:
        return Availability(False, f"base {spec.base.name}: {base.why}")
    adapter_path = Path(spec.location)
    if adapter_path.is_absolute() or adapter_path.exists():
        if (adapter_path / "adapter_config.json").is_file():
            return Availability(True, f"base {base.why}; adapter in {adapter_path}")
        problem = "has no adapter_config.json" if adapter_path.exists() else "does not exist"
        return _missing(spec, f"adapter directory {adapter_path} {problem}")
    if cached_snapshot(spec.location) is not None:
        return Availability(True, f"base {base.why}; adapter {spec.location} in the local Hugging Face cache")
    if allow_download and hub_reachable():
        return Availability(True, f"base {base.why}; adapter {spec.location} will be downloaded")
    return Availability(False, f"adapter {spec.location} is not in the local Hugging Face cache: "
                               f"run 'hf download {spec.location}' where the hub is reachable")


def _gguf_availability(spec: ModelSpec) -> Availability:
    path = Path(spec.location)
    entry = spec.entry
    if path.is_file():
        cached = _find_dequantised(path)
        note = "dequantised cache ready" if cached else "the first load dequantises it once (~30 s)"
        return Availability(True, f"{path.name} found; {note}")
    if entry is None:
        return Availability(False, f"{path} does not exist")
    if _package_dir(entry.package) is None:
        return _missing(spec, f"package {entry.package} is not installed")
    if entry.assemble:
        try:
            _import_package(entry.package).verify_chunks()
        except Exception as err:  # noqa: BLE001 - whatever the package raises, report it in one line
            return _missing(spec, f"package {entry.package} cannot assemble {entry.file} ({_one_line(err)})")
        return Availability(True, f"{entry.package} installed; first load assembles and dequantises it")
    return _missing(spec, f"package {entry.package} is installed but has no {entry.file}")


def _import_package(package: str):
    return importlib.import_module(package)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# ---------------------------------------------------------------------------------------------
# GGUF: dequantise once, cache as safetensors
# ---------------------------------------------------------------------------------------------

def cache_root() -> Path:
    """$ETBENCH_CACHE, default ~/.cache/etbench."""
    return Path(os.environ.get("ETBENCH_CACHE") or Path.home() / ".cache" / "etbench").expanduser()


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:  # size/mtime: a rewritten file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dequantised_dir(gguf_path: str | Path) -> Path:
    """Cache directory for one GGUF file: keyed by content hash, so a changed file is re-converted."""
    gguf_path = Path(gguf_path)
    return cache_root() / "gguf" / f"{gguf_path.stem}-{_sha256(gguf_path)[:16]}"


def _find_dequantised(gguf_path: Path) -> Path | None:
    target = dequantised_dir(gguf_path)
    return target if (target / GGUF_MANIFEST).is_file() else None


def ensure_dequantised(gguf_path: str | Path) -> Path:
    """Return a plain HF model directory (float32 safetensors + tokenizer) for a GGUF file.

    The first call dequantises (tens of seconds); the directory is written in a temporary sibling and
    renamed into place, so a crash never leaves a half-written cache and concurrent writers are safe.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path).resolve()
    target = dequantised_dir(gguf_path)
    if (target / GGUF_MANIFEST).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other model directory
    try:
        # dequantize=True gives ordinary nn.Linear weights, so the model saves like any other.
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import transformers

        atomic_write_json(tmp / GGUF_MANIFEST, {"source": str(gguf_path), "sha256": _sha256(gguf_path),
                                                "transformers": transformers.__version__, "dtype": "float32"})
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / GGUF_MANIFEST).is_file():  # not a concurrent writer winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


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
        _import_package(entry.package).assemble(output_path=partial, overwrite=True)
        os.replace(partial, path)
    except Exception as err:
        raise EtbenchError(f"{spec.name}: could not assemble {entry.file} ({_one_line(err)})") from None
    finally:
        if partial.exists():
            partial.unlink()
    return path


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

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


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise EtbenchError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def _check_device(device: str) -> None:
    if device in ("cpu", "auto") or device == "cuda" or device.startswith("cuda:") or device == "mps":
        return
    raise EtbenchError(f"device must be cpu, cuda, cuda:<n>, mps or auto, got {device!r}")


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
    if spec.kind == "hub":
        return cached_snapshot(spec.location, spec.revision)
    gguf = Path(spec.location)  # gguf: the dequantised cache, once converted
    return _find_dequantised(gguf) if gguf.is_file() else None


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
    it needs is estimated (``report(line)`` gets it) and a model that cannot fit fails in one line.
    """
    dtype = default_dtype(device) if dtype is None else dtype
    torch_dtype = _torch_dtype(dtype)
    _check_device(device)
    spec = resolve(ref, entries)
    status = availability(spec, allow_download=True)
    if not status.ok:
        raise EtbenchError(f"{spec.name} is not available: {status.why}")
    estimate = estimate_memory(spec, dtype, device)
    if estimate is not None:
        if report is not None:
            report(estimate.line(spec.name, dtype))
        if not estimate.fits:
            raise EtbenchError(
                f"{spec.name} does not fit: ~{estimate.weights_gb + estimate.activations_gb:.1f} GB needed "
                f"({dtype}), {estimate.available_gb:.1f} GB free on {estimate.where}; try --dtype bfloat16, "
                "--device auto (spread over GPUs, offload the rest) or a larger machine")
    loaded = _load_spec(spec, torch_dtype, device, trust_remote_code)
    model = loaded.model
    if device != "auto":
        model.to(device=device)
    model.to(dtype=torch_dtype)  # PEFT adapters are kept in float32 by peft; cast them with the rest
    model.eval()
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
    return ft.kind == "peft" and not ft.merge and ft.base == base


def load_pair(base_ref: str, ft_ref: str, dtype: str | None = "float32", device: str = "cpu",
              trust_remote_code: bool = False, *, entries: Mapping[str, RegistryEntry] | None = None,
              report=None) -> tuple[LoadedModel, LoadedModel]:
    """Both models of a pair. An unmerged adapter on the base (``shares_base``) is loaded once: the
    fine-tune is the ``PeftModel``, the base is the same object with its adapter off (half the
    memory of two copies; identical results, tests/model/test_shared_lora.py)."""
    if not shares_base(base_ref, ft_ref, entries):
        return (load(base_ref, dtype, device, trust_remote_code, entries=entries, report=report),
                load(ft_ref, dtype, device, trust_remote_code, entries=entries, report=report))
    from .adapter import AdapterDisabled  # why here: it needs torch, which this module imports lazily

    ft = load(ft_ref, dtype, device, trust_remote_code, entries=entries, report=report)
    base = LoadedModel(ref=base_ref, source=ft.base_source or base_ref, model=AdapterDisabled(ft.model).eval(),
                       tokenizer=ft.tokenizer, kind=resolve(base_ref, entries).kind, weights_dir=None)
    return base, ft


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
    except OSError as err:
        raise EtbenchError(f"{spec.name}: could not load from {source} ({_one_line(err)})") from None
    return model, tokenizer


def _tokenizer_source(spec: ModelSpec, weights_source: str) -> str:
    if not spec.tokenizer:
        return weights_source
    if spec.tokenizer.startswith(ASSET_PREFIX):
        return str(_asset_path(spec.tokenizer))
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
            raise EtbenchError(f"{spec.name}: cannot convert {gguf_path.name} ({_one_line(err)})") from None
        model, tokenizer = _from_pretrained(spec, str(weights_dir), torch_dtype, device, trust_remote_code)
        return _Loaded(model, tokenizer, str(gguf_path), str(weights_dir))
    return _load_peft(spec, torch_dtype, device, trust_remote_code)


def _load_peft(spec: ModelSpec, torch_dtype, device: str, trust_remote_code: bool) -> _Loaded:
    from peft import PeftModel

    base = _load_spec(spec.base, torch_dtype, device, trust_remote_code)
    adapter = spec.location
    if not Path(adapter).exists():
        snapshot = cached_snapshot(adapter)
        adapter = str(snapshot) if snapshot else adapter
    try:
        model = PeftModel.from_pretrained(base.model, adapter, is_trainable=False)
    except (OSError, ValueError) as err:
        raise EtbenchError(f"{spec.name}: could not load adapter {spec.location} ({_one_line(err)})") from None
    if spec.merge:
        model = model.merge_and_unload()
    tokenizer = base.tokenizer
    if spec.tokenizer:
        from transformers import AutoTokenizer

        tokenizer_source = _tokenizer_source(spec, adapter)
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_source, **_hub_kwargs(trust_remote_code, local=Path(tokenizer_source).is_dir()))
    return _Loaded(model, tokenizer, spec.location, adapter, base_source=base.source)


# ---------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelRow:
    """One line of ``etbench models list``."""

    alias: str
    kind: str
    description: str
    source: str
    available: bool
    why: str


def _describe_source(spec: ModelSpec) -> str:
    entry = spec.entry
    if spec.kind == "peft":
        merged = "merged" if spec.merge else "not merged"
        adapter = entry.adapter if entry else spec.location
        return f"{spec.base.name} + {adapter} ({merged})"
    if spec.kind == "gguf" and entry is not None:
        return f"PyPI {entry.package}: {entry.file}"
    return spec.location


def list_models() -> list[ModelRow]:
    """Every alias with where it comes from and whether it loads offline now. Loads nothing."""
    rows = []
    for alias, entry in registry().items():
        try:
            spec = _spec_from_entry(entry, registry())
            status = availability(spec, allow_download=False)
            source = _describe_source(spec)
        except EtbenchError as err:
            status, source = Availability(False, str(err)), "?"
        rows.append(ModelRow(alias=alias, kind=entry.kind, description=entry.description, source=source,
                             available=status.ok, why=status.why))
    return rows


def format_model_table(rows: list[ModelRow]) -> str:
    from tabulate import tabulate

    table = [(r.alias, r.kind, r.description, r.source, "yes" if r.available else "no", r.why) for r in rows]
    return tabulate(table, headers=("alias", "kind", "what it is", "source", "offline now", "why"),
                    tablefmt="simple", maxcolwidths=[None, None, 36, 32, None, 44])
