"""Submissions: one YAML file per fine-tuned checkpoint, validated, then ingested into the results store.

``etbench submit FILE`` checks everything before writing anything:

1. the file is YAML (``yaml.SafeLoader``, no key twice in one mapping), a mapping, and no larger than 1 MB;
2. ``trust_remote_code`` appears nowhere (etbench never runs code shipped with a model);
3. every path field (``scorecard``, ``model.path``, ``base.path``) stays inside the submission's directory;
4. the JSON Schema (``assets/schemas/submission.schema.json``) holds; aliases exist in the registry;
5. base and fine-tuned models share architecture and tokenizer: from their configs and tokenizer
   files when those are on this machine, and from the scorecard's model cards; no ``auto_map`` (custom code);
6. the scorecard, when given, is the current ``BENCHMARK_VERSION`` and schema version, its config hash is
   the hash of its config, which records the current definition of the preset it claims
   (``etbench.scoring.presets.SCORE_PRESETS``), it was not produced with ``--limit``, it publishes no
   local path, its models are the submission's (local weights: the same file hashes), and every number
   in it is re-derived from its items file and circuits (``etbench.publish.rederive``).

Then, holding the store's lock, it stages ``submissions/results/<name>/`` (``scorecard.json``, the items
file, ``submission.json``) and the rebuilt ``leaderboards/`` and renames them into place in one
``outputs.Transaction``: any failure leaves both untouched.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from etbench import models
from etbench.core.errors import EtbenchError
from etbench.core.io import (
    ASSETS_DIR,
    check_output_dir,
    dumps_json,
    jsonl_text,
    loads_json,
    read_json,
    read_jsonl,
)
from etbench.metrics import robustness
from etbench.metrics.dcm import dcm_preset
from etbench.publish import leaderboard as lb
from etbench.publish import outputs
from etbench.publish.rederive import rederive
from etbench.schema import scorecard as sc
from etbench.scoring import extend, pipeline
from etbench.scoring.presets import SCORE_PRESETS
from etbench.task.layout import check_vocabulary

SCHEMA_PATH = ASSETS_DIR / "schemas" / "submission.schema.json"
MAX_SUBMISSION_BYTES = 1_000_000
MAX_YAML_DEPTH = 16  # a submission is a few levels deep
PATH_FIELDS = (("scorecard",), ("model", "path"), ("base", "path"))


def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@dataclass
class Submission:
    file: Path
    data: dict[str, Any]
    name: str
    model_ref: str  # alias, hub id or absolute local path
    base_ref: str
    model_revision: Optional[str] = None
    base_revision: Optional[str] = None
    scorecard: Optional[Path] = None
    notes: list[str] = field(default_factory=list)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # "model"/"base" -> local config.json

    def metadata(self) -> dict[str, Any]:
        d = self.data
        return {
            "name": self.name,
            # published forms: a model submitted by local path is named, not located (no path of this machine)
            "model_ref": models.published_ref(self.model_ref),
            "model_revision": self.model_revision,
            "base_ref": models.published_ref(self.base_ref),
            "base_revision": self.base_revision,
            "fine_tuning": d["fine_tuning"],
            "license": d["license"],
            "contact": d["contact"],
            "description": d.get("description", ""),
            "submission_file": self.file.name,
        }


# ---------------------------------------------------------------------------------------------
# Static checks (the file alone)
# ---------------------------------------------------------------------------------------------

def _find_key(obj: Any, key: str, where: str = "") -> Optional[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            here = f"{where}.{k}" if where else str(k)
            if str(k) == key:
                return here
            found = _find_key(v, key, here)
            if found:
                return found
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _find_key(v, key, f"{where}[{i}]")
            if found:
                return found
    return None


def _get(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = data
    for part in path:
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def safe_relative(value: Any, field_name: str, base_dir: Path, origin: str) -> Path:
    """A path that must stay inside ``base_dir`` (no absolute paths, '~', '..', or escaping symlinks)."""
    if not isinstance(value, str) or not value.strip():
        raise EtbenchError(f"{origin}: {field_name} must be a non-empty relative path")
    bad = (value.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", value) is not None
           or "\\" in value or ".." in PurePosixPath(value).parts or "\x00" in value)
    full = None if bad else (base_dir / value).resolve()
    root = base_dir.resolve()
    if full is None or (full != root and root not in full.parents):
        raise EtbenchError(f"{origin}: {field_name}: path {value!r} leaves the submission's directory "
                           "(absolute paths, '~', '..' and outward symlinks are not allowed)")
    return full


def _schema_error(data: dict[str, Any], origin: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (list(e.absolute_path), e.message))
    if not errors:
        return
    err = jsonschema.exceptions.best_match(errors)
    where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    message = err.message
    if err.validator == "oneOf":
        message = "give exactly one of: alias; hub + revision; path"
    elif err.validator == "additionalProperties":
        message = message.replace("Additional properties are not allowed", "unknown field(s)")
    elif err.validator == "pattern":
        message = f"{err.instance!r} is not allowed here (must match {err.validator_value})"
    extra = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    raise EtbenchError(f"{origin}: {where}: {message}{extra}")


def _ref_of(part: dict[str, Any], what: str, base_dir: Path, origin: str) -> tuple[str, Optional[str]]:
    if "alias" in part:
        alias = part["alias"]
        if alias not in models.registry():
            known = ", ".join(sorted(models.registry()))
            raise EtbenchError(f"{origin}: {what}.alias: unknown alias {alias!r} (known: {known})")
        return alias, None
    if "hub" in part:
        return part["hub"], part["revision"]
    path = safe_relative(part["path"], f"{what}.path", base_dir, origin)
    if not path.is_dir():
        raise EtbenchError(f"{origin}: {what}.path: {part['path']!r} is not a directory")
    try:
        models.resolve(str(path))  # a directory must hold a model (config.json) or an adapter
    except EtbenchError:
        raise EtbenchError(f"{origin}: {what}.path: {part['path']!r} holds no model (no config.json or "
                           "adapter_config.json)") from None
    return str(path), None


def _unique_keys_loader(yaml):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (``safe_load`` keeps the last one
    silently: a second ``name:`` renamed the submission)."""

    class UniqueKeysLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                            key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeysLoader


def parse(file: str | Path) -> Submission:
    """Read and statically validate one submission file (nothing is written)."""
    import yaml

    file = Path(file)
    origin = str(file)
    if file.is_dir():
        raise EtbenchError(f"{origin}: is a directory; give the submission's YAML file")
    if not file.is_file():
        raise EtbenchError(f"{origin}: no such submission file")
    if file.stat().st_size > MAX_SUBMISSION_BYTES:
        raise EtbenchError(f"{origin}: larger than {MAX_SUBMISSION_BYTES} bytes; a submission is a short YAML file")
    try:
        text = file.read_text(encoding="utf-8")
        # One streaming pass first: anchors/aliases are refused (a submission never needs them, and nested
        # aliases can blow up), and so is deep nesting, as soon as it is seen (building a 5000-deep document
        # only to reject it took PyYAML half a minute).
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise EtbenchError(f"{origin}: YAML aliases (*name) are not allowed in a submission")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise EtbenchError(f"{origin}: YAML nested too deeply (more than {MAX_YAML_DEPTH} levels)")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        data = yaml.load(text, Loader=_unique_keys_loader(yaml))  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError:
        raise EtbenchError(f"{origin}: not UTF-8 text") from None
    except RecursionError:
        raise EtbenchError(f"{origin}: YAML nested too deeply") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise EtbenchError(f"{origin}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise EtbenchError(f"{origin}: expected a YAML mapping (name: ..., model: ..., ...), "
                           f"got {type(data).__name__}")
    remote = _find_key(data, "trust_remote_code")
    if remote:
        raise EtbenchError(f"{origin}: {remote}: trust_remote_code is not allowed; etbench never runs code "
                           "shipped with a model")
    base_dir = file.resolve().parent
    for path in PATH_FIELDS:
        value = _get(data, path)
        if value is not None:
            safe_relative(value, ".".join(path), base_dir, origin)
    _schema_error(data, origin)
    model_ref, model_rev = _ref_of(data["model"], "model", base_dir, origin)
    base_ref, base_rev = _ref_of(data["base"], "base", base_dir, origin)
    if (model_ref, model_rev) == (base_ref, base_rev):
        raise EtbenchError(f"{origin}: model and base are the same model ({model_ref})")
    card = None
    if "scorecard" in data:
        card = safe_relative(data["scorecard"], "scorecard", base_dir, origin)
        if card.is_dir():  # the field names the file (a directory was taken for the scorecard.json in it)
            raise EtbenchError(f"{origin}: scorecard: {data['scorecard']!r} is a directory; give the scorecard.json "
                               "file `etbench score` wrote")
        if not card.is_file():
            raise EtbenchError(f"{origin}: scorecard: {data['scorecard']!r} does not exist")
    return Submission(file, data, data["name"], model_ref, base_ref, model_rev, base_rev, card)


# ---------------------------------------------------------------------------------------------
# Model checks (local files only; nothing is downloaded or loaded)
# ---------------------------------------------------------------------------------------------

def _weights_dir(ref: str, revision: Optional[str]) -> Optional[Path]:
    """Directory holding config.json (and tokenizer files) of a model, when it is on this machine."""
    try:
        spec = models.resolve(ref)
    except EtbenchError:
        return None
    while spec.kind in ("peft", "built") and spec.base is not None:
        if spec.kind == "built" and models.find_built(spec) is not None:
            return models.find_built(spec)
        spec = spec.base  # an adapter, or a fine-tune not built yet, has its base's architecture and tokenizer
    if spec.kind == "directory":
        return Path(spec.location)
    if spec.kind == "hub":
        return models.cached_snapshot(spec.location, revision or spec.revision)
    if spec.kind == "gguf":
        if Path(spec.location).is_file():
            try:
                return models.find_dequantised(Path(spec.location))
            except Exception:  # noqa: BLE001 - best effort only
                return None
    return None


ARCH_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
             "vocab_size")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


def _read_config(directory: Path, origin: str, who: str) -> Optional[dict[str, Any]]:
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        config = models.read_config(path)
    except EtbenchError as err:
        raise EtbenchError(f"{origin}: {who}: {err}") from None
    if config.get("auto_map"):
        raise EtbenchError(f"{origin}: {who}: {path} needs custom model code (auto_map); etbench never runs "
                           "remote code")
    return config


def _tokenizer_digest(directory: Path) -> Optional[str]:
    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        if path.name == "tokenizer.json":
            data = json.loads(path.read_text(encoding="utf-8"))
            # the vocabulary and merges define tokenisation; padding/truncation settings do not
            h.update(json.dumps(data.get("model"), sort_keys=True).encode())
            h.update(json.dumps(data.get("added_tokens"), sort_keys=True).encode())
        else:
            h.update(path.read_bytes())
    return h.hexdigest()


def check_models(sub: Submission) -> None:
    """Same architecture and tokenizer for base and ft, when their files are on this machine."""
    origin = str(sub.file)
    ft_dir = _weights_dir(sub.model_ref, sub.model_revision)
    base_dir = _weights_dir(sub.base_ref, sub.base_revision)
    # every local config is read (and must be sound) even when the other model is not on this machine
    ft_cfg = _read_config(ft_dir, origin, "model") if ft_dir is not None else None
    base_cfg = _read_config(base_dir, origin, "base") if base_dir is not None else None
    sub.configs = {k: v for k, v in (("model", ft_cfg), ("base", base_cfg)) if v is not None}
    if ft_dir is None or base_dir is None:
        sub.notes.append("model files not on this machine: architecture checked from the scorecard only")
        return
    if ft_cfg is not None and base_cfg is not None:
        diffs = [f"{k} {base_cfg.get(k)!r} vs {ft_cfg.get(k)!r}" for k in ARCH_KEYS if base_cfg.get(k) != ft_cfg.get(k)]
        if diffs:
            raise EtbenchError(f"{origin}: base and fine-tuned architectures differ ({'; '.join(diffs)}); "
                               "etbench compares a fine-tuned model with the model it was tuned from")
    ft_tok, base_tok = _tokenizer_digest(ft_dir), _tokenizer_digest(base_dir)
    if ft_tok is not None and base_tok is not None and ft_tok != base_tok:
        raise EtbenchError(f"{origin}: base and fine-tuned tokenizers differ (vocabulary or merges); "
                           "item-level comparisons need the same tokenizer")
    if ft_tok is not None:
        _check_single_tokens(ft_dir, origin)


def _check_single_tokens(directory: Path, origin: str) -> None:
    """The benchmark's objects and labels must be single tokens for this tokenizer (7 boxes)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - an unloadable tokenizer is reported by scoring, not here
        return
    try:
        check_vocabulary(tokenizer).require(7)
    except EtbenchError as err:
        raise EtbenchError(f"{origin}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Scorecard checks
# ---------------------------------------------------------------------------------------------

def preset_name(config: dict[str, Any]) -> Optional[str]:
    """The preset a scorecard's config claims: ``config["preset"]`` is its name or its full definition."""
    preset = config.get("preset")
    if isinstance(preset, dict):
        preset = preset.get("name")
    return preset if isinstance(preset, str) and preset else None


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def check_preset(config: dict[str, Any]) -> Optional[str]:
    """Raise unless ``config`` was made with the *current* definition of its preset.

    Compares the preset (and its DCM settings) recorded in the config with ``SCORE_PRESETS`` now; the
    discovery mode may differ (a user choice that the config hash records).
    """
    name = preset_name(config)
    presets = SCORE_PRESETS
    if name not in presets:
        raise EtbenchError(f"unknown scoring preset {name!r} (known: {', '.join(sorted(presets))})")
    current = _plain(asdict(presets[name]))
    recorded = config.get("preset")
    if isinstance(recorded, dict):
        # a card scored before the edges section existed records no edge settings: its edges, if added later
        # (``submit --add-edges``), are checked against the current preset by ``rederive``
        differs = sorted(k for k in set(current) | set(recorded)
                         if k != "discovery_mode" and current.get(k) != recorded.get(k)
                         and not (k in sc.EDGE_PRESET_FIELDS and k not in recorded))
        if differs:
            raise EtbenchError(f"preset {name!r} has changed since this scorecard was made (differs in "
                               f"{', '.join(differs)}): score again with this etbench")
    if "dcm" in config:
        want = _plain(dcm_preset(presets[name].dcm, seed=config.get("seed", 0)).to_dict())
        if _plain(config["dcm"]) != want:
            raise EtbenchError(f"the DCM settings of preset {name!r} have changed since this scorecard was made: "
                               "score again with this etbench")
    return None


def _same_revision(recorded: Optional[str], claimed: Optional[str]) -> bool:
    """A tag cannot be checked against a recorded commit; two commit hashes must agree (prefixes allowed)."""
    if recorded is None or claimed is None or recorded == claimed:
        return True
    hexes = all(re.fullmatch(r"[0-9a-f]{7,40}", r) for r in (recorded, claimed))
    return not hexes or recorded.startswith(claimed) or claimed.startswith(recorded)


def _matches(card_model: sc.ModelCard, ref: str, revision: Optional[str]) -> bool:
    if Path(ref).is_absolute():  # local weights: their bytes must be the ones scored
        local = models.weights_revision(ref)
        return local is not None and card_model.revision == local
    if card_model.ref != ref and card_model.source != ref:
        return False
    return _same_revision(card_model.revision, revision)


_ABSOLUTE = re.compile(r"^(/|~|[A-Za-z]:[\\/])")


def _local_paths(card: sc.Scorecard) -> list[tuple[str, str]]:
    """(field, value) of every model reference or source in ``card`` that is a local absolute path."""
    found = []
    for who, m in (("base", card.base), ("ft", card.ft)):
        for part in ("ref", "source"):
            value = getattr(m, part)
            if any(_ABSOLUTE.match(piece.strip()) for piece in value.split("+")):
                found.append((f"{who}.{part}", value))
    for key in ("base", "ft", "circuit_base", "circuit_ft"):
        value = card.config.get(key)
        if isinstance(value, str) and _ABSOLUTE.match(value):
            found.append((f"config.{key}", value))
    return found


def check_scorecard(sub: Submission, card_path: Path) -> tuple[sc.Scorecard, bytes, bytes]:
    """Validate a scorecard for this submission; returns it with its canonical bytes and the items bytes."""
    origin = f"{sub.file}: scorecard {card_path.name}"
    card = sc.load(card_path)
    items_name = card.items_file
    items_path = sc.items_path(card_path, card, where=origin)
    if not items_path.is_file():
        raise EtbenchError(f"{origin}: items file {items_name} is missing (paired statistics need it)")
    items_bytes = items_path.read_bytes()
    items = read_jsonl(items_path, "per-item rows")
    check_card(sub, card, items, origin)
    return card, sc.canonical_bytes(card), items_bytes


def check_robustness(sub: Submission, card_path: Path, card: sc.Scorecard) -> Optional[robustness.Robustness]:
    """The ``robustness.json`` beside the scorecard, when there is one, re-derived from its rows and checked
    against the card (``metrics.robustness.check``); ``submit`` stores its canonical bytes with the row."""
    try:
        return robustness.load_checked(card_path, card, sc.load_items(card_path, card))
    except EtbenchError as err:
        raise EtbenchError(f"{sub.file}: {err}") from None


def check_card(sub: Submission, card: sc.Scorecard, items: list[dict[str, Any]], origin: str,
               memo: Optional[dict] = None) -> None:
    """Every check of a scorecard and its per-item rows for this submission (``check_scorecard`` after reading
    them); ``memo``: see ``rederive``."""
    if card.schema_version not in sc.SUBMITTABLE_SCHEMA_VERSIONS:
        raise EtbenchError(f"{origin}: scorecard schema version {card.schema_version} predates schema "
                           f"{sc.SUBMITTABLE_SCHEMA_VERSIONS[0]} (which keeps the rows that re-derive every number): score "
                           "again with this etbench, or convert it (etbench.publish.rederive.leave_out_underivable) so "
                           "that what it cannot re-derive is left out")
    local = [f"{where}: {value}" for where, value in _local_paths(card)]
    if local:
        raise EtbenchError(f"{origin}: publishes a local path ({local[0]}); score again with this etbench")
    if card.provenance.benchmark_version != sc.BENCHMARK_VERSION:
        raise EtbenchError(f"{origin}: benchmark version {card.provenance.benchmark_version!r} is not the current "
                           f"{sc.BENCHMARK_VERSION!r}: score again with this etbench")
    if card.limit is not None:
        raise EtbenchError(f"{origin}: produced with --limit {card.limit} (a smoke test); leaderboards need a full run")
    if sc.config_hash(card.config) != card.config_hash:
        raise EtbenchError(f"{origin}: config hash {card.config_hash} does not match its config "
                           f"({sc.config_hash(card.config)}): the scorecard was edited")
    recorded = preset_name(card.config)
    if recorded is None:
        raise EtbenchError(f"{origin}: its config names no preset, so it cannot be checked against one")
    claimed = sub.data.get("preset", recorded)
    if claimed != recorded:
        raise EtbenchError(f"{origin}: submission claims preset {claimed!r} but the scorecard was made with "
                           f"{recorded!r}")
    try:
        note = check_preset(card.config)
    except EtbenchError as err:
        raise EtbenchError(f"{origin}: {err}") from None
    if note:
        sub.notes.append(note)
    for who, ref, model_card in (("model", sub.model_ref, card.ft), ("base", sub.base_ref, card.base)):
        if Path(ref).is_absolute() and not _matches(model_card, ref, None):
            raise EtbenchError(f"{origin}: the submission's {who} files (revision {models.weights_revision(ref)}) "
                               f"are not the weights the scorecard scored (revision {model_card.revision}): "
                               "the scorecard is for another model")
    if not _matches(card.ft, sub.model_ref, sub.model_revision):
        raise EtbenchError(f"{origin}: scorecard is for fine-tuned model {card.ft.ref!r}, but the submission's "
                           f"model is {sub.model_ref!r}")
    if not _matches(card.base, sub.base_ref, sub.base_revision):
        raise EtbenchError(f"{origin}: scorecard is for base model {card.base.ref!r}, but the submission's base "
                           f"is {sub.base_ref!r}")
    arch_base = (card.base.architecture, card.base.n_layers, card.base.n_heads)
    arch_ft = (card.ft.architecture, card.ft.n_layers, card.ft.n_heads)
    if arch_base != arch_ft:
        raise EtbenchError(f"{origin}: base and fine-tuned architectures differ (architecture, layers, heads: "
                           f"{arch_base} vs {arch_ft})")
    for who, model_card in (("model", card.ft), ("base", card.base)):
        cfg = sub.configs.get(who)
        if cfg is None:
            continue
        local = (cfg.get("model_type"), cfg.get("num_hidden_layers"), cfg.get("num_attention_heads"))
        scored = (model_card.architecture, model_card.n_layers, model_card.n_heads)
        if None not in local and local != scored:
            raise EtbenchError(f"{origin}: the submission's {who} is {local} (architecture, layers, heads) but the "
                               f"scorecard scored {scored}: the scorecard is for another model")
    if not any(r.get("measure") == "accuracy" for r in items):
        raise EtbenchError(f"{origin}: items file {card.items_file} has no accuracy rows")
    try:
        sub.notes.extend(rederive(card, items, memo))
    except EtbenchError as err:
        raise EtbenchError(f"{origin}: {err}") from None


def _score(sub: Submission, out_dir: Path) -> Path:
    run = pipeline.score(sub.base_ref, sub.model_ref, out_dir, progress=False)
    return Path(getattr(run, "path", run))


# ---------------------------------------------------------------------------------------------
# Submit
# ---------------------------------------------------------------------------------------------

@dataclass
class SubmitResult:
    name: str
    written: list[Path]
    rows: int
    notes: list[str]


def submit(file: str | Path, root: str | Path = ".", replace: bool = False, add_edges: bool = False,
           work_dir: str | Path | None = None, device: str = "cpu", progress: bool = False) -> SubmitResult:
    """Validate ``file`` fully, then write its results and rebuild the leaderboard, all or nothing.

    The store entry is staged in a hidden directory and renamed into place with the leaderboard files
    (``outputs.Transaction``), under the store's lock: concurrent submits serialise, and each one
    renders the leaderboard from every entry stored when it holds the lock. An incomplete entry of the
    same name (left by a killed writer of an older etbench, or damaged) is replaced without ``--replace``.

    ``add_edges``: the submission's scorecard, checked as it is, gets the ``edges`` section it lacks, computed from
    its own models, circuits and seed (``scoring.extend.add_edges``; its stages kept in ``work_dir``, default a
    temporary directory), and is checked again and stored; it replaces the stored entry of this name when that
    entry holds this very scorecard (the row it extends), which keeps its submission date.
    """
    import tempfile

    root = lb.check_root(root)
    sub = parse(file)
    results_dir = root / lb.RESULTS_SUBDIR
    target = results_dir / sub.name
    board_dir = root / lb.LEADERBOARD_DIR
    if add_edges and sub.scorecard is None:
        raise EtbenchError(f"{sub.file}: --add-edges extends the submission's scorecard, and it names none")
    extends = add_edges and _stores_card(target, sub.scorecard)
    if target.exists() and not (replace or extends) and _complete(target):
        raise EtbenchError(f"{sub.file}: {sub.name!r} is already submitted ({target}); pass --replace to update it")
    check_output_dir(results_dir, "submissions/results")
    check_output_dir(board_dir, "leaderboards")
    if work_dir is not None:
        check_output_dir(work_dir, "--work")
    check_models(sub)
    with tempfile.TemporaryDirectory(prefix="etbench-score-") as tmp:
        card_path = sub.scorecard if sub.scorecard is not None else _score(sub, Path(tmp))
        card, card_bytes, items_bytes = check_scorecard(sub, card_path)
        if add_edges:
            card, items = extend.add_edges(card_path, work_dir or tmp, device=device, progress=progress)
            card_bytes = sc.canonical_bytes(card)
            items_bytes = jsonl_text(items).encode("utf-8")
            check_card(sub, card, items, f"{sub.file}: scorecard {card_path.name} with edges added")
        rob = check_robustness(sub, card_path, card)
    meta = sub.metadata()
    stored = read_json(target / "submission.json", "submission record") if extends else {}
    meta.update({"config_hash": card.config_hash, "benchmark_version": card.provenance.benchmark_version,
                 "scorecard_sha256": hashlib.sha256(card_bytes).hexdigest(),
                 "items_sha256": hashlib.sha256(items_bytes).hexdigest(),
                 # the leaderboard's date column (UTC day; the build itself stays a function of stored files); a
                 # section added to a stored row keeps the row's date (the card's provenance records the addition)
                 "submitted": stored.get("submitted") or datetime.now(timezone.utc).date().isoformat()})
    entry_files = {"scorecard.json": card_bytes, card.items_file: items_bytes,
                   "submission.json": dumps_json(meta).encode("utf-8")}
    if rob is not None:
        entry_files.update(robustness.stored_files(rob))
    items = [loads_json(line) for line in items_bytes.decode("utf-8").splitlines() if line.strip()]
    with lb.locked(root):
        if extends and not _stores_card(target, sub.scorecard):
            raise EtbenchError(f"{sub.file}: the stored entry {sub.name!r} changed while its edges were computed")
        if target.exists() and not (replace or extends) and _complete(target):  # another process submitted it meanwhile
            raise EtbenchError(f"{sub.file}: {sub.name!r} is already submitted ({target}); pass --replace")
        if target.exists() and not (replace or extends):
            sub.notes.append(f"replaced an incomplete stored entry {sub.name!r}")
        problems: list[str] = []
        entries = lb.load_entries(results_dir, exclude=(sub.name,), problems=problems)
        sub.notes.extend(problems)
        # the board is rendered from this entry as it will be stored, its robustness included (it was left out:
        # the row's robustness table line was missing until the next build)
        entries = sorted(entries + [lb.Entry(sub.name, meta, card, items, rob)], key=lambda e: e.name)
        board = lb.render(entries)
        outputs.remove_own_temporaries(board_dir, board)
        with outputs.Transaction() as txn:
            txn.write_dir(target, entry_files)
            written = [target / name for name in entry_files] + outputs.write_tree(board_dir, board, txn)
    rows = len(entries) + len(lb.paper_results()["rows"])
    return SubmitResult(sub.name, written, rows, sub.notes)


def _stores_card(entry: Path, card_path: Optional[Path]) -> bool:
    """True when the complete stored ``entry`` holds the scorecard at ``card_path`` (the bytes it recorded)."""
    if card_path is None or not card_path.is_file() or not _complete(entry):
        return False
    stored = read_json(entry / "submission.json", "submission record").get("scorecard_sha256")
    return stored == hashlib.sha256(card_path.read_bytes()).hexdigest()


def _complete(entry: Path) -> bool:
    try:
        lb.load_entry(entry)
    except EtbenchError:
        return False
    return True


def validate(file: str | Path) -> Submission:
    """All checks of ``submit`` without writing (``etbench submit --check``)."""
    sub = parse(file)
    check_models(sub)
    if sub.scorecard is not None:
        card, _, _ = check_scorecard(sub, sub.scorecard)
        check_robustness(sub, sub.scorecard, card)
    return sub
