"""One copy of the base weights for a base model and its unmerged adapter (``load_pair``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from etbench.models.load import LoadedModel, load, shares_base
from etbench.models.registry import RegistryEntry, resolve


class AdapterDisabled(torch.nn.Module):
    """The base model of a ``PeftModel``, computed on the fine-tune's own copy of the base weights:
    every call runs with the adapter switched off (``PeftModel.disable_adapter``), which is the base
    model's forward exactly (a LoRA layer then calls only its base layer).

    Not for concurrent use with the fine-tune from several threads: switching the adapter off is a
    state of the shared modules."""

    def __init__(self, peft_model) -> None:
        super().__init__()
        self.peft = peft_model

    @property
    def config(self):
        return self.peft.config

    def get_output_embeddings(self):
        return self.peft.get_output_embeddings()

    def forward(self, *args, **kwargs):
        with self.peft.disable_adapter():
            return self.peft(*args, **kwargs)


def load_pair(base_ref: str, ft_ref: str, dtype: str | None = "float32", device: str = "cpu",
              trust_remote_code: bool = False, *, entries: Mapping[str, RegistryEntry] | None = None,
              report=None) -> tuple[LoadedModel, LoadedModel]:
    """Both models of a pair. An unmerged adapter on the base (``shares_base``) is loaded once: the
    fine-tune is the ``PeftModel``, the base is the same object with its adapter off (half the
    memory of two copies; identical results, tests/model/test_shared_lora.py)."""
    if not shares_base(base_ref, ft_ref, entries):
        return (load(base_ref, dtype, device, trust_remote_code, entries=entries, report=report),
                load(ft_ref, dtype, device, trust_remote_code, entries=entries, report=report))
    ft = load(ft_ref, dtype, device, trust_remote_code, entries=entries, report=report)
    base = LoadedModel(ref=base_ref, source=ft.base_source or base_ref, model=AdapterDisabled(ft.model).eval(),
                       tokenizer=ft.tokenizer, kind=resolve(base_ref, entries).kind, weights_dir=None)
    return base, ft
