"""One copy of the base weights for a base model and its unmerged adapter (``models.load_pair``)."""

from __future__ import annotations

import torch


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

    def forward(self, *args, **kwargs):
        with self.peft.disable_adapter():
            return self.peft(*args, **kwargs)
