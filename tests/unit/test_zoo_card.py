"""The zoo's model card shows exactly the accuracies of its card_results.json, and names every row's command."""

from __future__ import annotations

from etbench.core.io import read_json
from etbench.training.zoo import ASSET_DIR, ROWS, card_table


def test_card_table_is_the_measured_results():
    text = (ASSET_DIR / "MODEL_CARD.md").read_text(encoding="utf-8")
    results = read_json(ASSET_DIR / "card_results.json")
    assert card_table(results) in text


def test_card_describes_every_row_and_its_command():
    text = (ASSET_DIR / "MODEL_CARD.md").read_text(encoding="utf-8")
    for row in ROWS:
        lr = f"{row.lr:.0e}".replace("e-0", "e-")  # 1e-3, as the card writes it
        assert f"| `{row.name}` | {row.steps} | {lr} | {row.seed} |" in text
    assert "python -m etbench.training.zoo --only tiny-goat" in text
