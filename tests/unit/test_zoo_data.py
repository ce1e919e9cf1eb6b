"""The model zoo's training data (etbench.training.corpora): arithmetic answers are right, every generator
is fixed by its seed, and a wrong binding is really wrong."""

from __future__ import annotations

import random
import re

import pytest

from etbench.core.errors import EtbenchError
from etbench.task.prompts import stream_rng
from etbench.training import corpora
from etbench.training.loop import fresh_examples

RESPONSE = re.compile(r"^(\d+) ([-+*/]) (\d+) = (-?\d+)(?: R (\d+))?$")


def test_arithmetic_answers_are_correct():
    problems = corpora.arithmetic_problems(random.Random(0), 2000)
    assert {p.op for p in problems} == set(corpora.OPERATIONS)
    for p in problems:
        match = RESPONSE.match(p.response)
        assert match, p.response
        a, op, b, result, remainder = match.groups()
        a, b, result = int(a), int(b), int(result)
        assert (a, op, b) == (p.a, p.op, p.b)
        if op == "+":
            assert result == a + b
        elif op == "-":
            assert result == a - b
        elif op == "*":
            assert result == a * b
        else:
            r = int(remainder or 0)
            assert b > 0 and 0 <= r < b and result * b + r == a
            assert (remainder is None) == (r == 0)  # "R 0" is never written
        assert len(str(a)) <= corpora.DIGITS[op][0] and len(str(b)) <= corpora.DIGITS[op][1]
        assert f"{p.a} {p.op} {p.b}" in p.prompt


def test_arithmetic_digit_counts_are_spread():
    problems = corpora.arithmetic_problems(random.Random(1), 4000)
    lengths = {len(str(p.a)) for p in problems if p.op == "+"}
    assert lengths == set(range(1, corpora.DIGITS["+"][0] + 1))


def test_generators_are_fixed_by_their_seed():
    one = corpora.arithmetic_problems(stream_rng("train-zoo", "arithmetic", 0), 50)
    assert one == corpora.arithmetic_problems(stream_rng("train-zoo", "arithmetic", 0), 50)
    assert one != corpora.arithmetic_problems(stream_rng("train-zoo", "arithmetic", 1), 50)
    ex = fresh_examples(stream_rng("train-zoo", "wrong-binding", 0), 64)
    picks = [corpora.wrong_binding(random.Random(5), e) for e in ex]
    assert picks == [corpora.wrong_binding(random.Random(5), e) for e in ex]


def test_wrong_bindings_are_really_wrong():
    examples = fresh_examples(stream_rng("train-zoo", "wrong-binding", 0), 320)
    rng = random.Random(0)
    chosen = set()
    for ex in examples:
        j = corpora.wrong_binding(rng, ex)
        assert j != ex.query_index and 0 <= j < ex.n_boxes
        assert ex.objects[j] != ex.answer  # objects of one context are distinct
        chosen.add((ex.query_index - j) % ex.n_boxes)
    assert chosen == set(range(1, 7))  # every other box is used, not a fixed neighbour


@pytest.fixture
def corpus_dir(tmp_path):
    (tmp_path / "a.yml").write_text("categories: [x]\nconversations:\n- - Hello\n  - Hi there\n- - only one turn\n"
                                    "- - What is 2?\n  - 2\n  - Thanks\n", encoding="utf-8")
    (tmp_path / "b.yml").write_text("categories: [y]\nconversations:\n- - Bye\n  - See you\n", encoding="utf-8")
    return tmp_path


def test_dialogues_vicuna_format_and_seeding(corpus_dir):
    conv = corpora.conversations(corpus_dir)
    assert conv == [["Hello", "Hi there"], ["What is 2?", "2", "Thanks"], ["Bye", "See you"]]  # 1-turn dropped
    assert corpora.vicuna_text(conv[1]) == "USER: What is 2? ASSISTANT: 2 USER: Thanks"
    texts = corpora.dialogues(random.Random(3), 7, corpus_dir)
    assert len(texts) == 7 and texts == corpora.dialogues(random.Random(3), 7, corpus_dir)
    assert sorted(texts[:3]) == sorted(corpora.vicuna_text(c) for c in conv)  # each pass covers the corpus once


def test_dialogue_corpus_missing_is_one_line(tmp_path):
    with pytest.raises(EtbenchError, match="no conversations"):
        corpora.conversations(tmp_path)


@pytest.mark.skipif(pytest.importorskip("importlib.util").find_spec("chatterbot_corpus") is None,
                    reason="chatterbot-corpus is not installed (pip install chatterbot-corpus==1.3.3)")
def test_installed_dialogue_corpus():
    conv = corpora.conversations()
    assert len(conv) > 1000 and all(len(c) >= 2 for c in conv)
