"""The nnsight backend: etbench's edit plans executed through nnsight traces, locally or on NDIF.

Same contract as the hook backend (``etbench.mech.interventions``): ``NnsightRunner.run(hm, inputs, edits)``
returns the model output with every ``Edit`` applied at the same module with the same slicing
(``interventions.apply_edits``), so both backends give the same logits; ``cache`` reads head values
like ``interventions.cache``. Edits on z rewrite the *input* of the attention output projection (the
hook backend's forward pre-hook), q/k/v edits the projection's *output*. nnsight requires modules to be
visited in execution order within a trace (its ``OutOfOrderError``), so sites are visited by layer,
q/k/v before z (attention's module registration order).

Remote: ``NnsightRunner.for_ndif(repo_id)`` wraps a weightless skeleton of a model NDIF hosts (its
config comes from the Hugging Face hub); every ``run`` is then one request to NDIF, authenticated by
``api_key`` (or ``NDIF_API_KEY``). What travels is the trace body (its source) and the values it uses:
the edits' tensors and closures (etbench's code is shipped by value, since NDIF does not have it
installed), never the model. Values come back only through ``.save()``: so on the remote path a
``interventions.read`` edit (which stores into a caller's dict) is replaced by a slot in the trace's
saved store, and its value is put into the caller's dict when the result comes back. No KV cache
travels (``use_cache=False``: prefix reuse falls back to whole prompts) and no gradient comes back
(a non-detached read is refused). ``remote="local"`` is nnsight's dry run of that path: serialised and
deserialised with local modules hidden, then run here.

API key: ``api_key``, else ``NDIF_API_KEY``, else the key nnsight stored (``nnsight login`` or
``nnsight.CONFIG.set_default_api_key``); see ``ndif_api_key``.
"""

from __future__ import annotations

import copy
import linecache
import os
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from etbench.core.errors import EtbenchError
from etbench.mech.heads import HeadMap, read_heads
from etbench.mech.interventions import Edit, Reader, Site, apply_edits, bind_runner
from etbench.models.load import LoadedModel

#: Where NDIF's API lives unless ``host`` or ``NDIF_HOST`` says otherwise (nnsight's default).
NDIF_HOST = "https://api.ndif.us"


def ndif_api_key(api_key: str | None = None) -> str:
    """The NDIF API key a remote run sends: ``api_key``, else ``NDIF_API_KEY``, else the key nnsight
    stored (``nnsight login`` writes it to nnsight's user config). One ``EtbenchError`` if none."""
    from nnsight import CONFIG

    key = api_key or os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY
    if not key:
        raise EtbenchError("a remote (NDIF) run needs an NDIF API key: set NDIF_API_KEY, or store one with "
                           "`nnsight login` (nnsight.CONFIG.set_default_api_key)")
    return key


def ndif_host(host: str | None = None) -> str:
    """Where NDIF's API is: ``host``, else ``NDIF_HOST``, else nnsight's configured host."""
    from nnsight import CONFIG

    return host or os.environ.get("NDIF_HOST") or CONFIG.API.HOST or NDIF_HOST


@dataclass(frozen=True)
class _ReadSlot:
    """Stands in for a ``Reader`` in a remote trace: where its value goes in the saved store."""

    slot: int


@dataclass(frozen=True)
class _ModuleVisit:
    """One module touched by a trace: its path, whether its input (z) or output (q/k/v) is edited,
    the edits per head-tensor kind, and the sites read from it."""

    path: str
    where: str  # "input" | "output"
    edits: tuple[tuple[str, tuple[Edit, ...]], ...]
    reads: tuple[Site, ...]


def _head_only(hm: HeadMap | None) -> HeadMap | None:
    # why: the trace body needs only the sizes (hm.view); a HeadMap without module references keeps
    # the model's modules out of a remote request's payload
    return None if hm is None else HeadMap(hm.spec, ())


def _plan(paths: Mapping[int, str], hm: HeadMap | None, edits: Sequence[Edit], reads: Sequence[Site]) -> list[_ModuleVisit]:
    """The modules to visit, in execution order, with what to do at each (``edits`` in list order;
    a ``_ReadSlot`` edit stores the values it sees)."""
    by_module: dict[int, dict[str, Any]] = {}
    order: dict[int, tuple[int, int]] = {}
    if (edits or reads) and hm is None:
        raise EtbenchError("edits and reads need the model's HeadMap")
    for item in list(edits) + list(reads):
        module = hm.module(item.layer, item.kind)  # validates layer and kind
        key = id(module)
        if key not in paths:
            raise EtbenchError(f"layer {item.layer} {item.kind}: the module is not part of the wrapped model")
        slot = by_module.setdefault(key, {"edits": {}, "reads": [], "kind": item.kind})
        if isinstance(item, Edit):
            slot["edits"].setdefault(item.kind, []).append(item)
        else:
            slot["reads"].append(item)
        rank = 1 if item.kind == "z" else 0  # q/k/v projections run before the output projection
        order[key] = (item.layer, rank)
    visits = []
    for key in sorted(by_module, key=lambda k: order[k]):
        slot = by_module[key]
        where = "input" if slot["kind"] == "z" else "output"
        visits.append(_ModuleVisit(paths[key], where, tuple((k, tuple(es)) for k, es in slot["edits"].items()),
                                   tuple(slot["reads"])))
    return visits


def _visit(envoy, visit: _ModuleVisit, hm: HeadMap, store: dict) -> None:
    """At one module inside a trace: read the requested sites, then apply the edits (in list order,
    per kind, as the hook backend does) and write the result back."""
    value = envoy.input if visit.where == "input" else envoy.output
    for site in visit.reads:
        store[(site.layer, site.kind)] = read_heads(hm.view(site.kind, value), site.positions, site.heads).detach()
    current = value
    for kind, edits in visit.edits:
        pending: list[Edit] = []
        for e in (*edits, None):  # None: apply what is pending at the end
            if e is not None and not isinstance(e.fn, _ReadSlot):
                pending.append(e)
                continue
            new = apply_edits(hm, kind, current, pending) if pending else None
            current, pending = (current if new is None else new), []
            if e is not None:  # a read sees the edits listed before it, as under the hook backend
                store[("read", e.fn.slot)] = read_heads(hm.view(kind, current), e.positions, e.heads).detach()
    if current is not value:
        if visit.where == "input":
            envoy.input = current
        else:
            envoy.output = current


class NnsightRunner:
    """Runs edit plans on one model through nnsight.

    ``NnsightRunner(model, tokenizer)`` wraps a loaded torch model (a ``PeftModel`` too) for local
    traces; ``NnsightRunner.for_ndif(repo_id, ...)`` targets a model hosted on NDIF."""

    def __init__(self, model, tokenizer=None, *, remote: bool | str = False, api_key: str | None = None,
                 host: str | None = None, _wrapped=None) -> None:
        from nnsight import NNsight, TransformersModel

        self.remote = remote
        self.api_key = api_key if api_key is not None else os.environ.get("NDIF_API_KEY")
        self.host = ndif_host(host)
        self.tokenizer = tokenizer
        if _wrapped is None and not remote:
            _wrapped = NNsight(model)  # why the generic wrapper: etbench passes token ids, no tokenizer needed
        elif _wrapped is None:
            if tokenizer is None:
                raise EtbenchError("a remote run needs the model's tokenizer")
            # why a copy: nnsight sets padding_side="left" (and a pad token) on the tokenizer it is given
            _wrapped = TransformersModel(model, tokenizer=copy.deepcopy(tokenizer))
        self.nn_model = _wrapped
        # the torch module the envoys mirror (for a remote skeleton: nnsight's meta copy; no public accessor)
        self.module = model if model is not None else self.nn_model._module
        self.paths = {id(m): name for name, m in self.module.named_modules()}

    @classmethod
    def for_ndif(cls, repo_id: str, *, api_key: str | None = None, host: str | None = None,
                 revision: str | None = None) -> "NnsightRunner":
        """A runner whose traces run on NDIF. Needs the hub for the model's config and tokenizer (not
        its weights) and an API key (``ndif_api_key``). ``.module`` is the weightless skeleton
        (``meta`` tensors) that etbench's head maps are built on; ``.tokenizer`` the hub's tokenizer."""
        from nnsight import TransformersModel
        from transformers import AutoTokenizer

        key = ndif_api_key(api_key)
        extra = {"revision": revision} if revision else {}
        try:
            wrapped = TransformersModel(repo_id, **extra)
            tokenizer = AutoTokenizer.from_pretrained(repo_id, **extra)  # unchanged (nnsight pads its own copy)
        except (OSError, ValueError) as err:
            raise EtbenchError(f"{repo_id}: cannot read its config and tokenizer from the hub "
                               f"({' '.join(str(err).split())})") from None
        runner = cls(None, remote=True, api_key=key, host=host, _wrapped=wrapped)
        runner.tokenizer = tokenizer
        return runner

    def backend(self):
        """The nnsight backend of one request: None (local), nnsight's local simulation of the remote
        path, or an NDIF ``RemoteBackend`` carrying the model key, host and API key."""
        if not self.remote:
            return None
        import nnsight

        # why by value: NDIF has no etbench installed; the edit closures and helpers travel as source
        nnsight.register(__name__.split(".")[0])
        if self.remote == "local":
            from nnsight.intervention.backends.local import LocalSimulationBackend

            return LocalSimulationBackend(self.nn_model)
        from nnsight.intervention.backends.remote import RemoteBackend

        return RemoteBackend(self.nn_model.to_model_key(), host=self.host, api_key=self.api_key,
                             env=self.nn_model._remoteable_get_env())

    def _check_remote(self, edits: Sequence[Edit]) -> None:
        if self.remote and any(isinstance(e.fn, Reader) and not e.fn.detach for e in edits):
            raise EtbenchError("a read that keeps the autograd graph (gradients) cannot run remotely: "
                               "values come back from NDIF detached")

    def run(self, hm: HeadMap | None, inputs: Mapping[str, torch.Tensor], edits: Sequence[Edit] = (), **forward_kwargs):
        """The model output with ``edits`` applied (``interventions.run``'s contract)."""
        output, _ = self._trace(hm, inputs, edits, (), forward_kwargs)
        return output

    def cache(self, hm: HeadMap, inputs: Mapping[str, torch.Tensor], sites: Sequence[Site], edits: Sequence[Edit] = (),
              **forward_kwargs) -> dict:
        """``{(layer, kind): values}`` for each site, read before that module's edits (as
        ``interventions.cache`` for no edits)."""
        keys = [(s.layer, s.kind) for s in sites]
        if len(set(keys)) != len(keys):
            raise EtbenchError("cache: two sites share a (layer, kind); merge their heads/positions into one site")
        _, store = self._trace(hm, inputs, edits, sites, forward_kwargs)
        return store

    def _trace(self, hm: HeadMap, inputs, edits, sites, forward_kwargs):
        self._check_remote(edits)
        readers: list[Reader] = []
        if self.remote:
            # why: nnsight's request (de)serialisation can leave only the trace block's source in linecache under
            # this file's name; the serializer then rebuilds _visit from that entry and fails ("Could not find
            # function '_visit'") -- seen when a simulated remote run follows other nnsight tests in one process
            linecache.cache.pop(__file__, None)
            # why slots: a remote trace cannot write into the caller's dict; its value comes back saved
            edits = [_slot(e, readers) if isinstance(e.fn, Reader) else e for e in edits]
            # why no cache: the KV cache of every pass would travel back (and up again for prefix reuse);
            # without one, prefix.PatchRunner runs whole prompts (the same numbers, tests/unit/test_prefix.py)
            forward_kwargs = {**forward_kwargs, "use_cache": False}
            inputs = {k: v.cpu() for k, v in inputs.items()}
        plan = _plan(self.paths, hm, edits, sites)
        spec_only = _head_only(hm)
        nn_model = self.nn_model
        backend = self.backend()
        # TransformersModel takes the batch as one dict (its tokenizer step); NNsight passes kwargs on
        args = (dict(inputs),) if self.remote else ()
        kwargs = dict(forward_kwargs) if self.remote else {**inputs, **forward_kwargs}
        with nn_model.trace(*args, backend=backend, **kwargs):
            store = dict().save()
            for visit in plan:
                _visit(nn_model.get(visit.path), visit, spec_only, store)
            output = nn_model.output.save()
        for slot, reader in enumerate(readers):
            reader.into[reader.key] = store.pop(("read", slot))
        return output, store


def _slot(edit: Edit, readers: list[Reader]) -> Edit:
    readers.append(edit.fn)
    return Edit(edit.layer, edit.kind, _ReadSlot(len(readers) - 1), edit.positions, edit.heads)


_RUNNERS: "weakref.WeakKeyDictionary[torch.nn.Module, NnsightRunner]" = weakref.WeakKeyDictionary()


def runner_for(model, tokenizer=None) -> NnsightRunner:
    """The runner of ``model``: the NDIF runner ``load_remote`` made for its skeleton, else one local
    runner per model (wrapping is not free: nnsight builds an envoy tree)."""
    if model not in _RUNNERS:
        _RUNNERS[model] = NnsightRunner(model, tokenizer)
    return _RUNNERS[model]


def load_remote(ref: str, repo_id: str, *, revision: str | None = None, api_key: str | None = None,
                host: str | None = None) -> LoadedModel:
    """A hub model NDIF hosts, as a ``LoadedModel`` whose ``model`` is a weightless skeleton: every
    forward pass on it (``interventions.run``) is one NDIF request. Downloads the config and
    tokenizer, never the weights."""
    runner = NnsightRunner.for_ndif(repo_id, api_key=api_key, host=host, revision=revision)
    _RUNNERS[runner.module] = runner
    bind_runner(runner.module, run)  # whatever backend is in force: the skeleton has no weights to run here
    return LoadedModel(ref=ref, source=repo_id, model=runner.module, tokenizer=runner.tokenizer, kind="hub")


def run(model, hm: HeadMap | None, inputs: Mapping[str, torch.Tensor], edits: Sequence[Edit] = (), **forward_kwargs):
    """``interventions.run`` through nnsight (local)."""
    return runner_for(model).run(hm, inputs, edits, **forward_kwargs)
