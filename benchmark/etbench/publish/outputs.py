"""Output trees: files written all or nothing, and the manifest by which a command knows its own files.

A command never deletes or overwrites a file it did not create. Each command that writes a tree of files
into a directory the user names (``leaderboard build``, ``report``, ``compare --out``) is a ``Writer``: it
lists what it wrote in its manifest, a hidden file in that directory, and ``write_tree`` replaces a file
only when that manifest lists it (or when it already holds the exact bytes to be written). Anything else of
the same name is the user's: the write is refused before anything is touched. ``Writer`` and the manifest
rules live in ``core.io``, so ``etbench score`` (the scoring layer, below this one) keeps a manifest too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from etbench.core.errors import EtbenchError
from etbench.core.io import (
    Writer,
    dumps_json,
    generated_files,
    refuse_foreign_files,
    remove_stale_temporaries,
    temporary_name,
)


def _write(path: Path, data: bytes) -> None:
    """The one place files are written (tests monkeypatch it to simulate an interrupted write)."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class Transaction:
    """Write, delete and replace files and directories all or nothing.

    Nothing visible changes inside ``with``: every new file (or directory) is staged as a hidden
    temporary next to its target. On a clean exit the temporaries are renamed into place, each
    replaced target first kept as a hidden backup; if a rename fails, those already done are renamed
    back. Renames need no free space, so a full disk or a file-size limit fails while staging, when
    nothing has been touched yet. A process killed mid-way leaves only hidden ``.tmp``/``.bak``
    entries, which ``remove_stale_temporaries`` deletes under the store's lock.
    """

    def __init__(self) -> None:
        self._staged: dict[Path, Optional[Path]] = {}  # target -> staged temporary (None: delete the target)
        self._created_dirs: list[Path] = []

    def _make_parent(self, path: Path) -> None:
        missing, parent = [], path.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        if not parent.is_dir():
            raise EtbenchError(f"{path}: cannot be written: {parent} is not a directory")
        for directory in reversed(missing):
            directory.mkdir()
            self._created_dirs.append(directory)

    def _drop(self, path: Path) -> None:
        old = self._staged.pop(path, None)
        if old is not None:
            _remove(old)

    def write(self, path: Path, data: bytes) -> None:
        path = Path(path)
        self._drop(path)
        if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
            return
        if path.is_dir():
            raise EtbenchError(f"{path}: is a directory, cannot write a file there")
        self._make_parent(path)
        tmp = temporary_name(path)
        self._staged[path] = tmp
        _write(tmp, data)
        os.chmod(tmp, 0o644)

    def write_dir(self, path: Path, files: dict[str, bytes]) -> None:
        """Make directory ``path`` hold exactly ``files`` (name -> bytes), replacing it as a whole."""
        path = Path(path)
        self._drop(path)
        self._make_parent(path)
        tmp = temporary_name(path)
        self._staged[path] = tmp
        tmp.mkdir()
        for name, data in files.items():
            _write(tmp / name, data)
            os.chmod(tmp / name, 0o644)

    def delete(self, path: Path) -> None:
        path = Path(path)
        self._drop(path)
        if path.exists():
            self._staged[path] = None

    def commit(self) -> None:
        done: list[tuple[Path, Optional[Path]]] = []  # (target, its backup)
        try:
            for target, tmp in self._staged.items():
                backup = None
                if target.exists() or target.is_symlink():
                    backup = temporary_name(target, ".bak")
                    os.replace(target, backup)
                done.append((target, backup))
                if tmp is not None:
                    os.replace(tmp, target)
        except BaseException:
            for target, backup in reversed(done):
                try:
                    if target.exists() and self._staged.get(target) is not None:
                        _remove(target)
                    if backup is not None:
                        os.replace(backup, target)
                except OSError:
                    pass
            self.rollback()
            raise
        self._staged = {}
        for _, backup in done:
            if backup is not None:
                _remove(backup)

    def rollback(self) -> None:
        for tmp in self._staged.values():
            if tmp is not None:
                _remove(tmp)
        self._staged = {}
        for directory in sorted(self._created_dirs, key=lambda p: len(p.parts), reverse=True):
            try:
                directory.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()
        return False


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


#: ``etbench leaderboard build`` (and ``etbench submit``, which rebuilds the leaderboard).
LEADERBOARD_BUILD = Writer("etbench leaderboard build", ".etbench-manifest.json")
#: The build's manifest file name (the leaderboard's own outputs list it among their files).
MANIFEST_NAME = LEADERBOARD_BUILD.manifest


def remove_own_temporaries(out_dir: Path, files: dict[str, bytes], writer: Writer = LEADERBOARD_BUILD) -> None:
    """Delete the temporaries a killed ``writer`` left in ``out_dir``: only those of its own files (this write's,
    its manifest's, the manifest itself). ``out_dir`` is the user's: a file of theirs named like a temporary
    stays."""
    out_dir = Path(out_dir)
    remove_stale_temporaries(out_dir, set(generated_files(out_dir, writer)) | set(files) | {writer.manifest})


def write_tree(out_dir: Path, files: dict[str, bytes], txn: Transaction,
               writer: Writer = LEADERBOARD_BUILD) -> list[Path]:
    """Write ``files`` (relative path -> bytes) into ``out_dir`` and delete the files ``writer`` generated
    there earlier that are not among them (listed in its manifest); every other file in ``out_dir`` is left
    alone. A file of the same name as an output that ``writer`` did not write (not in its manifest) and that
    differs from it is the user's: refused, before anything is written, not overwritten."""
    out_dir = Path(out_dir)
    generated = set(generated_files(out_dir, writer))
    refuse_foreign_files(out_dir, files, writer)
    written = []
    for rel, data in files.items():
        path = out_dir / rel
        txn.write(path, data)
        written.append(path)
    for rel in sorted(generated):
        if rel not in files and (out_dir / rel).is_file():
            txn.delete(out_dir / rel)
    txn.write(out_dir / writer.manifest, dumps_json({"generated_by": writer.command,
                                                      "files": sorted(files)}).encode("utf-8"))
    return written
