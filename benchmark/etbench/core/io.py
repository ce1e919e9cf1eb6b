"""Files and JSON: atomic writes (a reader sees the old file or the new one, never half of either), strict
canonical JSON (no NaN/Infinity), reads whose every failure is one ``EtbenchError`` naming the file, output
paths checked before any work, an inter-process lock, and the configuration hash that tells comparable
runs apart."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etbench.core.errors import EtbenchError

#: Package data shipped inside etbench (registry, circuits, adapters, schemas, page assets).
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same directory so os.replace is a rename on one filesystem.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary shareable files
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None:  # a failed write() names no file: name it
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Canonical strict JSON (sorted keys, fixed indentation; NaN/Infinity refused with the place they are)
    so equal results give equal bytes and every reader can parse them."""
    bad = nonfinite_paths(obj)
    if bad:
        raise EtbenchError(f"refusing to write non-finite numbers (JSON has no NaN/Infinity) at {', '.join(bad[:5])}")
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, dumps_json(obj))


def jsonl_text(rows: Iterable[dict]) -> str:
    """Rows as JSON lines, as ``atomic_write_jsonl`` writes them."""
    return "".join(json.dumps(row, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, jsonl_text(rows))


def finite(x: float | None) -> float | None:
    """``x`` as a float, or None when it is missing or not finite (JSON has no NaN)."""
    return None if x is None or not math.isfinite(x) else float(x)


def jsonable(obj: Any) -> Any:
    """Round-trip-safe JSON: tuples -> lists, non-finite floats -> None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        return finite(obj)
    return obj


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of a configuration (canonical JSON), to tell comparable runs apart."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Strict JSON: no NaN/Infinity on disk, and every unreadable file is one error naming it
# ---------------------------------------------------------------------------------------------

def _refuse_constant(constant: str) -> Any:
    raise ValueError(f"non-finite number {constant} (JSON has no NaN or Infinity)")


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` that refuses NaN/Infinity (``ValueError``)."""
    return json.loads(text, parse_constant=_refuse_constant)


def _read_bytes(path: str | os.PathLike, what: str) -> tuple[str, bytes]:
    """(label naming the file for errors, its bytes); missing or unreadable is one ``EtbenchError``."""
    path = Path(path)
    label = f"{path}" + (f" ({what})" if what else "")
    try:
        return label, path.read_bytes()
    except FileNotFoundError:
        raise EtbenchError(f"{label}: no such file") from None
    except OSError as err:
        raise EtbenchError(f"{label}: cannot read ({err.strerror or err})") from None


def read_json(path: str | os.PathLike, what: str = "") -> Any:
    """Parse a strict JSON file; any failure (missing, unreadable, not UTF-8, not JSON, NaN) is an
    ``EtbenchError`` naming the file."""
    label, data = _read_bytes(path, what)
    try:
        return loads_json(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise EtbenchError(f"{label}: not UTF-8 text (corrupt?)") from None
    except json.JSONDecodeError as err:
        raise EtbenchError(f"{label}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except ValueError as err:
        raise EtbenchError(f"{label}: {err}") from None
    except RecursionError:
        raise EtbenchError(f"{label}: JSON nested too deeply") from None


def read_jsonl(path: str | os.PathLike, what: str = "") -> list[dict]:
    """JSON lines, one object per line, strictly (see ``read_json``); errors name the file and line."""
    label, data = _read_bytes(path, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise EtbenchError(f"{label}: not UTF-8 text (corrupt?)") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = loads_json(line)
        except json.JSONDecodeError as err:
            raise EtbenchError(f"{label}: line {number} is not valid JSON ({err.msg}; truncated?)") from None
        except ValueError as err:
            raise EtbenchError(f"{label}: line {number}: {err}") from None
        except RecursionError:
            raise EtbenchError(f"{label}: line {number}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise EtbenchError(f"{label}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def nonfinite_paths(obj: Any, where: str = "") -> list[str]:
    """Where ``obj`` holds NaN or ±Infinity (``accuracy[2].accuracy.low``)."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [where or "(top level)"]
    if isinstance(obj, Mapping):
        return [p for k, v in obj.items() for p in nonfinite_paths(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in nonfinite_paths(v, f"{where}[{i}]")]
    return []


# ---------------------------------------------------------------------------------------------
# Output paths: checked before any work, so a bad --out never costs a computed result
# ---------------------------------------------------------------------------------------------

MIN_FREE_BYTES = 1 << 20  # an output directory with less free space than this is refused up front


def _nearest_existing(path: Path) -> Path:
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _check_writable_dir(directory: Path, label: str, target: Path) -> None:
    where = f"{label}: cannot write {target}" if target != directory else f"{label}: {directory}"
    if not os.access(directory, os.W_OK | os.X_OK):
        raise EtbenchError(f"{where}: {directory} is not writable")
    try:
        fd, probe = tempfile.mkstemp(prefix=".etbench-probe.", suffix=".tmp", dir=directory)
    except OSError as err:
        raise EtbenchError(f"{where}: cannot create files in {directory} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)
    try:
        stat = os.statvfs(directory)
    except (OSError, AttributeError):  # no statvfs (Windows): the write itself will tell
        return
    if stat.f_bavail * stat.f_frsize < MIN_FREE_BYTES:
        raise EtbenchError(f"{where}: no space left in {directory} ({stat.f_bavail * stat.f_frsize} bytes free)")


def check_output_dir(path: str | os.PathLike, label: str = "--out") -> Path:
    """``path`` can be (or become) a directory this process can write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EtbenchError(f"{label}: {path} exists and is not a directory")
    existing = _nearest_existing(path.absolute())
    if not existing.is_dir():
        raise EtbenchError(f"{label}: {path} cannot be created: {existing} is not a directory")
    _check_writable_dir(existing, label, path)
    return path


def check_output_file(path: str | os.PathLike, label: str = "--out") -> Path:
    """``path`` can be written as a file (it is not a directory; its directory can be created and written)."""
    path = Path(path)
    if path.is_dir():
        raise EtbenchError(f"{label}: {path} is a directory; give a file name")
    existing = _nearest_existing(path.absolute().parent)
    if not existing.is_dir():
        raise EtbenchError(f"{label}: {path} cannot be created: {existing} is not a directory")
    _check_writable_dir(existing, label, path)
    return path


# ---------------------------------------------------------------------------------------------
# Output ownership: a command never overwrites or deletes a file it did not create
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Writer:
    """A command that writes files into an output directory, and the name of its manifest there."""

    command: str  # as the user types it, for messages ("etbench report")
    manifest: str  # hidden file in the output directory listing what this command wrote


def generated_files(out_dir: Path, writer: Writer) -> list[str]:
    """The files ``writer`` last wrote into ``out_dir`` (relative, inside it); [] without a manifest."""
    path = out_dir / writer.manifest
    if not path.is_file():
        return []
    try:
        listed = read_json(path).get("files", [])
    except (EtbenchError, AttributeError):
        return []  # an unreadable manifest claims nothing: no file is deleted or overwritten on its word
    root = out_dir.resolve()
    safe = []
    for rel in listed if isinstance(listed, list) else []:
        if isinstance(rel, str) and rel and not rel.startswith(("/", "\\")) and ".." not in Path(rel).parts:
            if root in (out_dir / rel).resolve().parents:
                safe.append(rel)
    return safe


def refuse_foreign_files(out_dir: Path, files: Mapping[str, bytes | None], writer: Writer) -> None:
    """Raise, before anything is written, when ``out_dir`` holds a file named like one of ``files`` (relative
    path -> the bytes to be written, or None when they are not known yet) that ``writer``'s manifest does not
    list, unless it already holds exactly those bytes: that file is someone else's."""
    out_dir = Path(out_dir)
    _refuse_foreign_manifest(out_dir, writer)
    generated = set(generated_files(out_dir, writer))
    for rel, data in files.items():
        path = out_dir / rel
        if path.is_symlink():  # written through, it would change the link's target; replaced, the link is lost
            raise EtbenchError(f"{path} is a symbolic link: `{writer.command}` writes a regular file of that name and "
                               "never replaces or writes through a link: move it away or choose another output")
        if rel in generated or not path.exists():
            continue
        if data is None or not path.is_file() or path.read_bytes() != data:
            raise EtbenchError(f"{path} exists and was not written by `{writer.command}` (it is not in "
                               f"{out_dir / writer.manifest}): move it away or choose another output directory")


def _refuse_foreign_manifest(out_dir: Path, writer: Writer) -> None:
    """The manifest's own name holds either nothing or a manifest (a JSON object with a list of files): anything
    else there is someone else's, and replacing it (or failing on it only when claiming) is refused up front."""
    path = out_dir / writer.manifest
    if not (path.is_symlink() or path.exists()):
        return
    try:
        ok = path.is_file() and not path.is_symlink() and isinstance(read_json(path).get("files"), list)
    except (EtbenchError, AttributeError):
        ok = False
    if not ok:
        raise EtbenchError(f"{path} is not a manifest written by `{writer.command}`: move it away or choose "
                           "another output directory")


def claim_outputs(out_dir: Path, names: Iterable[str], writer: Writer) -> None:
    """Add ``names`` to ``writer``'s manifest in ``out_dir`` (atomically), just before writing them: from then
    on the next run of the command may replace them. Checks again, as ``refuse_foreign_files``, that none of
    them is someone else's: a long run checks first, but a file may have appeared while it ran."""
    out_dir = Path(out_dir)
    names = list(names)
    refuse_foreign_files(out_dir, dict.fromkeys(names), writer)
    atomic_write_bytes(out_dir / writer.manifest, manifest_bytes(writer, [*generated_files(out_dir, writer), *names]))


def manifest_bytes(writer: Writer, names: Iterable[str]) -> bytes:
    """``writer``'s manifest listing ``names``, as ``claim_outputs`` writes it."""
    return dumps_json({"generated_by": writer.command, "files": sorted(set(names))}).encode("utf-8")


def refuse_foreign_file(path: str | os.PathLike, writer: Writer) -> None:
    """``refuse_foreign_files`` for a command's single output file (``--out FILE``): its manifest is the one in the
    file's directory."""
    path = Path(path)
    refuse_foreign_files(path.parent, {path.name: None}, writer)


@contextlib.contextmanager
def claimed(out_dir: str | os.PathLike, names: Iterable[str], writer: Writer):
    """``claim_outputs`` for the block that writes ``names``; when the block fails (a full disk, a file-size
    limit), the manifest is put back as it was, so a failed command leaves nothing behind, not even a manifest
    naming files it never wrote."""
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    manifest = out_dir / writer.manifest
    before = manifest.read_bytes() if manifest.is_file() else None
    claim_outputs(out_dir, names, writer)
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            if before is None:
                manifest.unlink(missing_ok=True)
                if created:
                    out_dir.rmdir()  # only when empty: what the block wrote stays, and is named by the error
            else:
                atomic_write_bytes(manifest, before)
        raise


def claimed_file(path: str | os.PathLike, writer: Writer):
    """``claimed`` for a command's single output file (its manifest is the one in the file's directory)."""
    path = Path(path)
    return claimed(path.parent, [path.name], writer)


# ---------------------------------------------------------------------------------------------
# Inter-process lock, stale temporaries
# ---------------------------------------------------------------------------------------------

#: ``temporary_name``'s shape: ``.<name>.<12 hex digits>.tmp|.bak``. Only this shape is ever deleted as stale,
#: so a user's own hidden backups (``.bashrc.2020.bak``) in an output directory are never touched.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.(tmp|bak)")


class FileLock:
    """An exclusive ``flock`` on ``path`` (created if needed) for the ``with`` block: concurrent
    ``etbench`` processes serialise their read-render-write of a shared tree. No-op where ``fcntl``
    is missing (Windows)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> "FileLock":
        try:
            import fcntl
        except ImportError:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def temporary_name(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden sibling of ``path`` (``.<name>.<random><suffix>``) that ``is_temporary`` recognises."""
    return path.with_name(f".{path.name}.{os.urandom(6).hex()}{suffix}")


def is_temporary(path: Path) -> bool:
    """A temporary that etbench's writers make (``.<name>.<12 hex>.tmp`` or ``.bak``, file or directory)."""
    return _TEMPORARY.fullmatch(path.name) is not None


def temporary_target(path: Path) -> Path:
    """The file a temporary (``.<name>.<12 hex>.tmp`` or ``.bak``) stands for: ``<name>`` beside it."""
    return path.with_name(path.name[1:].rsplit(".", 2)[0])


def remove_stale_temporaries(directory: str | os.PathLike, targets: Iterable[str] | None = None) -> list[Path]:
    """Delete temporaries left under ``directory`` by a killed writer (call with the tree's lock held).

    ``targets``: in a directory the user named (a leaderboard ``--out``), only the temporaries of these files
    (paths relative to ``directory``: the writer's own outputs) are deleted; a file of the user's that happens to
    be named like a temporary is not etbench's to delete. None: every temporary (a store etbench owns)."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    owned = None if targets is None else {Path(t) for t in targets}
    for path in sorted(directory.rglob(".*")):
        if not is_temporary(path) or any(p in removed for p in path.parents):
            continue
        if owned is not None and temporary_target(path).relative_to(directory) not in owned:
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed
