"""``--remote`` (NDIF through nnsight): every refusal comes before a model loads (one line, exit 2,
nothing written), and the remote scoring path run end to end through nnsight's local simulation of an
NDIF request (the trace serialised and deserialised as for NDIF, etbench's own code shipped by value,
then run here) writes the scorecard the same stages give locally with hooks. Nothing here reaches the
network: the NDIF runner is swapped for the simulation, and the request itself is checked in
tests/model/test_nnsight_backend.py (test_ndif_request_is_built_without_network)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest

pytest.importorskip("nnsight")

import torch  # noqa: E402

from etbench import api, models  # noqa: E402
from etbench.core.errors import EtbenchError  # noqa: E402
from etbench.core.io import atomic_write_json  # noqa: E402
from etbench.mech import nnsight_backend as nb  # noqa: E402
from etbench.models import toy  # noqa: E402
from etbench.schema.circuit import Circuit, Node  # noqa: E402
from etbench.scoring import pipeline  # noqa: E402
from etbench.scoring.presets import Preset  # noqa: E402

HUB_BASE, HUB_FT = "example-org/tiny-base-hosted", "example-org/tiny-ft-hosted"  # never fetched
CIRCUITS = dict(circuit_base="tiny-base", circuit_ft="tiny-base")  # for the refusals: never loaded
# small enough for a CPU test; every remote stage runs (accuracy, ceilings, faithfulness with draws, CMAP)
PRESET = Preset("remote-test", accuracy_n=8, accuracy_boxes=(3,), discovery_mode="fast", discovery_n=4,
                minimality_n=4, faithfulness_n=8, mean_n=8, random_draws=1, completeness_draws=1, dcm="quick",
                dcm_seeds=(0,), dcm_groups=("value_fetcher",), cmap_n=8, cmap_variants=("output",), batch_size=8)


@pytest.fixture
def no_key(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "test-key")


def _cli(*args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NDIF_API_KEY"}
    env["NNSIGHT_CONFIG"] = str(tmp_path / "no-nnsight-config.yaml")  # no stored key either
    return subprocess.run([sys.executable, "-m", "etbench.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("args, fragment", [
    (["score", "--remote", "--base", HUB_BASE, "--ft", HUB_FT], "add --backend nnsight"),
    (["accuracy", "-m", HUB_BASE, "--remote", "--backend", "nnsight"], "set NDIF_API_KEY, or store one with `nnsight login`"),
])
def test_cli_refuses_in_one_line_and_writes_nothing(tmp_path, args, fragment):
    out = tmp_path / "out"
    result = _cli(*args, "--out", str(out), tmp_path=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1 and lines[0].startswith("etbench: error:")
    assert fragment in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(base="tiny-base"), "is an adapter"),
    (dict(ft="gemma3-270m"), "is a GGUF file"),
    (dict(circuit_ft=None), "give --circuit-ft"),
    (dict(circuit_base=None, circuit_ft=None), "give --circuit-base and --circuit-ft"),
    (dict(dtype="bfloat16"), "--dtype does not apply"),
    (dict(device="auto"), "--device does not apply"),
    (dict(share_base_weights=True), "--share-base-weights does not apply"),
    (dict(backend="hooks"), "add --backend nnsight"),
])
def test_score_refuses_before_loading(tmp_path, key, monkeypatch, kwargs, fragment):
    monkeypatch.setattr(nb.NnsightRunner, "for_ndif", _never)
    args = dict(base=HUB_BASE, ft=HUB_FT, backend="nnsight", **CIRCUITS)
    args.update(kwargs)
    with pytest.raises(EtbenchError, match=re.escape(fragment)):
        api.score(out_dir=tmp_path / "out", remote=True, progress=False, **args)
    assert not (tmp_path / "out").exists()


def test_a_local_directory_is_not_a_hosted_model(tmp_path, key, toy_model_dir):
    with pytest.raises(EtbenchError, match="is a local model directory"):
        api.accuracy(str(toy_model_dir), backend="nnsight", remote=True)


def test_api_key_comes_from_the_environment_then_nnsight_config(no_key, monkeypatch):
    from nnsight import CONFIG

    with pytest.raises(EtbenchError, match="NDIF_API_KEY.*nnsight login"):
        nb.ndif_api_key()
    monkeypatch.setattr(CONFIG.API, "APIKEY", "stored-by-nnsight-login")
    assert nb.ndif_api_key() == "stored-by-nnsight-login"
    monkeypatch.setenv("NDIF_API_KEY", "from-env")
    assert nb.ndif_api_key() == "from-env"
    assert nb.ndif_api_key("given") == "given"


def _never(*args, **kwargs):
    raise AssertionError("a model was loaded before the inputs were checked")


@pytest.fixture(scope="module")
def hosted(tmp_path_factory):
    """Two toy models standing in for a hosted pair (a base and a perturbed copy), and a circuit file."""
    tok = toy.word_level_tokenizer()
    base = toy.tiny_llama(len(tok), n_layers=2, n_heads=4, seed=0)
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    nodes = {"value_fetcher": [Node("value_fetcher", 1, 0)], "position_transmitter": [Node("position_transmitter", 0, 1)],
             "position_detector": [Node("position_detector", 0, 3)], "structure_reader": [Node("structure_reader", 0, 0)]}
    circuit = tmp_path_factory.mktemp("circuit") / "circuit.json"
    atomic_write_json(circuit, Circuit(nodes, model="toy", n_layers=2, n_heads=4).to_dict())
    loaded = {repo: models.LoadedModel(ref=repo, source=repo, model=m, tokenizer=tok, kind="hub")
              for repo, m in ((HUB_BASE, base), (HUB_FT, ft))}
    return loaded, str(circuit)


def test_remote_scoring_writes_the_scorecard_local_hooks_give(tmp_path, key, monkeypatch, hosted):
    local, circuit = hosted
    circuits = dict(circuit_base=circuit, circuit_ft=circuit)
    # the reference first (the simulated run binds these model objects to their nnsight runners): the
    # same stages on the same models, every pass through hooks, loaded as a remote run loads them
    monkeypatch.setattr(pipeline, "load_remote", lambda ref, repo_id, **kw: replace(local[repo_id], ref=ref))
    hooks = pipeline.score(HUB_BASE, HUB_FT, tmp_path / "hooks", preset=PRESET, remote=True, progress=False,
                           **circuits)
    monkeypatch.undo()
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    requests = _simulate_ndif(monkeypatch, local)
    remote = pipeline.score(HUB_BASE, HUB_FT, tmp_path / "remote", preset=PRESET, remote=True, progress=False,
                            **circuits)
    assert set(requests) == {HUB_BASE, HUB_FT} and len(requests) > 20  # every pass was one (simulated) request
    assert (tmp_path / "remote" / "items.jsonl").read_bytes() == (tmp_path / "hooks" / "items.jsonl").read_bytes()
    assert (tmp_path / "remote" / "scorecard.json").read_bytes() == (tmp_path / "hooks" / "scorecard.json").read_bytes()
    card = remote.card
    assert card.config["execution"] == "ndif" and card.provenance.device == "ndif"
    assert card.accuracy and card.faithfulness and card.cmap
    assert {s.heads for s in card.cmap} == {"circuit"} and not card.dcm  # no DCM remotely: the whole-circuit set
    stage = json.loads((tmp_path / "remote" / "stages" / "dcm_ft_seed0.json").read_text())
    assert pipeline.REMOTE_DCM_NOTE in json.dumps(stage)
    assert hooks.card.config == card.config


def test_remote_accuracy_equals_local_hooks(key, monkeypatch, hosted):
    local, _ = hosted
    # the same weights in a fresh object: another test may have bound the fixture's model to an NDIF runner
    fresh = toy.tiny_llama(len(local[HUB_BASE].tokenizer), n_layers=2, n_heads=4, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 local[HUB_BASE].model.state_dict().values()))
    base = replace(local[HUB_BASE], model=fresh)
    reference = api.accuracy(HUB_BASE, n_boxes=(3,), n=8, seed=0, batch_size=8, progress=False, loaded=base)
    requests = _simulate_ndif(monkeypatch, local)
    remote = api.accuracy(HUB_BASE, n_boxes=(3,), n=8, seed=0, batch_size=8, progress=False, backend="nnsight",
                          remote=True)
    assert requests and set(requests) == {HUB_BASE}
    assert [(i.predicted_id, i.correct) for i in remote.results[0].items] == [
        (i.predicted_id, i.correct) for i in reference.results[0].items]


def _simulate_ndif(monkeypatch, local) -> list[str]:
    """``for_ndif`` builds a runner over the local model on nnsight's simulated remote path; returns the
    list each request's repo id is appended to."""
    requests: list[str] = []

    def simulated_ndif(repo_id, *, api_key=None, host=None, revision=None):
        runner = nb.NnsightRunner(local[repo_id].model, local[repo_id].tokenizer, remote="local")
        real_backend = runner.backend
        runner.backend = lambda: requests.append(repo_id) or real_backend()
        return runner

    monkeypatch.setattr(nb.NnsightRunner, "for_ndif", staticmethod(simulated_ndif))
    return requests
