"""GGUF weights: dequantised once and cached as a plain safetensors model directory, keyed by the
file's content hash (a changed file is converted again)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from etbench.core.io import atomic_write_json

#: Written last into a finished cache directory: its presence marks the conversion complete.
GGUF_MANIFEST = "etbench_gguf.json"

def cache_root() -> Path:
    """$ETBENCH_CACHE, default ~/.cache/etbench."""
    return Path(os.environ.get("ETBENCH_CACHE") or Path.home() / ".cache" / "etbench").expanduser()


def sha256_file(path: Path) -> str:
    """Content hash of a file (memoised while its size and mtime stay the same)."""
    stat = path.stat()
    return sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def sha256_of(path: str, size: int, mtime_ns: int) -> str:  # size/mtime: a rewritten file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dequantised_dir(gguf_path: str | Path) -> Path:
    """Cache directory for one GGUF file: keyed by content hash, so a changed file is re-converted."""
    gguf_path = Path(gguf_path)
    return cache_root() / "gguf" / f"{gguf_path.stem}-{sha256_file(gguf_path)[:16]}"


def find_dequantised(gguf_path: Path) -> Path | None:
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

        atomic_write_json(tmp / GGUF_MANIFEST, {"source": str(gguf_path), "sha256": sha256_file(gguf_path),
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
