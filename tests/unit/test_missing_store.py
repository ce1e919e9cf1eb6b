"""``compare`` and ``report`` outside the checkout (review-s8): the default stores are relative paths, so from
another directory none exists. The error said "no scorecard of 'tiny-ft' vs 'gemma-ft' ...: run `etbench score
--base tiny-ft --ft gemma-ft`", treating a stored fine-tune as a base (the suggestion issue 25 removed for
``compare tiny-ft nosuch``); it now says that no store exists there."""

from __future__ import annotations

import pytest

from etbench.core.errors import EtbenchError
from etbench.publish import report


def test_compare_with_no_existing_store_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stores = [tmp_path / "submissions" / "results", tmp_path / "etbench-out"]
    with pytest.raises(EtbenchError, match="no scorecard store here: .* do not exist") as err:
        report.resolve_pair("tiny-ft", "gemma-ft", stores)
    assert "--base tiny-ft" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(EtbenchError, match="no scorecard store here: .* does not exist"):
        report.find_one("tiny-ft", [tmp_path / "nosuch"])


def test_an_existing_empty_store_keeps_the_old_messages(tmp_path):
    with pytest.raises(EtbenchError, match="no scorecard of 'some-base' vs 'some-ft'.*etbench score --base some-base"):
        report.resolve_pair("some-base", "some-ft", [tmp_path])
    with pytest.raises(EtbenchError, match="no scorecard\\(s\\) for 'nope'"):
        report.find_one("nope", [tmp_path])
