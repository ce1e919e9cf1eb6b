"""A saved toy base/fine-tuned pair and a hand-made circuit on it, for end-to-end scoring tests."""

from __future__ import annotations

from pathlib import Path

from etbench.core.io import atomic_write_json
from etbench.models import toy
from etbench.schema.circuit import Circuit, Node


def write_toy_pair(root: Path) -> Path:
    """``root/base``, ``root/ft`` (random 2-layer, 4-head toys of seeds 0 and 1, one word-level tokenizer)
    and ``root/circuit.json``: a given circuit, so DCM and CMAP have heads to work on (random toys give
    empty discovered circuits)."""
    tokenizer = toy.word_level_tokenizer()
    for seed, name in enumerate(("base", "ft")):
        model = toy.tiny_llama(len(tokenizer), seed=seed, n_layers=2, n_heads=4)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    nodes = {"value_fetcher": [Node("value_fetcher", 1, 0), Node("value_fetcher", 1, 2)],
             "position_transmitter": [Node("position_transmitter", 0, 1)],
             "position_detector": [Node("position_detector", 0, 3)],
             "structure_reader": [Node("structure_reader", 0, 0)]}
    atomic_write_json(root / "circuit.json", Circuit(nodes, model="toy", n_layers=2, n_heads=4).to_dict())
    return root
