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


# ------------------------------------------------------------------ issue #28: locker, key-value, code data

def _recall_sets():
    return {"kv": corpora.kv_recall(stream_rng("train-zoo", "kv", 0), 320),
            "code": corpora.code_lookup(stream_rng("train-zoo", "code", 0), 320)}


def test_recall_and_code_are_fixed_by_their_seed():
    for make in (corpora.kv_recall, corpora.code_lookup):
        one = make(stream_rng("train-zoo", "x", 0), 40)
        assert one == make(stream_rng("train-zoo", "x", 0), 40)
        assert one != make(stream_rng("train-zoo", "x", 1), 40)
    examples = fresh_examples(stream_rng("train-zoo", "locker", 0), 40)
    assert [corpora.locker_prompt(ex) for ex in examples] == [
        corpora.locker_prompt(ex) for ex in fresh_examples(stream_rng("train-zoo", "locker", 0), 40)]


def test_key_value_answer_is_the_queried_keys_value_in_the_context():
    queried = set()
    for item in _recall_sets()["kv"]:
        keys = [k for k, _ in item.bindings]
        values = [v for _, v in item.bindings]
        assert len(item.bindings) == corpora.RECALL_PAIRS
        assert len(set(keys)) == len(keys) and len(set(values)) == len(values)  # one right answer
        context, query = item.prompt.rsplit(". ", 1)
        assert query == f"{item.query} ->" and item.answer == " " + values[item.query_index]
        segments = context.split(", ")
        assert segments == [f"{k}: {v}" for k, v in item.bindings]
        assert f"{item.query}:{item.answer}" in segments  # the answer really is bound to the key in the text
        queried.add(item.query_index)
    assert queried == set(range(corpora.RECALL_PAIRS))


def test_code_answer_is_the_printed_variables_value():
    for item in _recall_sets()["code"]:
        names = [n for n, _ in item.bindings]
        values = [v for _, v in item.bindings]
        assert len(set(names)) == len(names) and len(set(values)) == len(values)
        lines = item.prompt.split("\n")
        assert lines[-1] == "" and lines[-2] == f">>> print({item.query})"
        assert lines[:-2] == [f">>> {n} = {v}" for n, v in item.bindings]
        assert f">>> {item.query} = {item.answer}\n" in item.prompt and item.answer.isdigit()
        # executing the session prints the answer
        scope: dict = {}
        exec("\n".join(line[4:] for line in lines[:-2]), scope)  # noqa: S102 - generated assignments only
        assert str(scope[item.query]) == item.answer


def test_locker_pairs_chosen_is_right_and_rejected_is_another_box():
    examples = fresh_examples(stream_rng("train-zoo", "locker", 0), 160)
    rng = random.Random(0)
    for ex in examples:
        prompt, chosen = corpora.locker_prompt(ex)
        wrong = corpora.wrong_binding(rng, ex)
        same_prompt, rejected = corpora.locker_prompt(ex, wrong)
        assert same_prompt == prompt and chosen == " " + ex.answer and rejected != chosen
        assert prompt.endswith(f". Locker {ex.query_label} has the")
        assert f"the {ex.answer} was left in locker {ex.query_label}" in prompt[0].lower() + prompt[1:]


def test_new_data_are_disjoint_from_the_evaluation_wordings():
    """No fine-tune trains on a benchmark wording (etbench.task.prompts.WORDINGS), nor on tiny-ft's crate wording."""
    from etbench.task.prompts import WORDINGS, paper_objects

    texts = [item.prompt for items in _recall_sets().values() for item in items]
    texts += [corpora.locker_prompt(ex)[0] for ex in fresh_examples(stream_rng("train-zoo", "locker", 0), 64)]
    markers = {piece.strip() for w in WORDINGS.values()
               for piece in (w.before_label, w.before_query_label, w.after_query_label)}
    markers |= {"sits inside crate", "Crate", "holds a", "Box", "Bin"}
    assert "is in Box" in markers and "contains the" in markers  # the check is not vacuous
    for text in texts:
        assert not any(marker in text for marker in markers), text
    assert not set(corpora.VALUE_WORDS) & set(paper_objects())  # recall values are not the task's objects
    assert len(set(corpora.VALUE_WORDS)) == len(corpora.VALUE_WORDS) >= corpora.RECALL_PAIRS
