"""Toy tokenizers and models built in seconds, offline: for tests, examples and smoke runs.

They carry no entity-tracking ability (random weights); the embedded real pair lives in
``etbench.models``. Two tokenizer families are provided on purpose: a word-level one (words carry
no space marker) and a byte-level BPE (GPT-2 style ``Ġword`` tokens), so position logic is tested on
two different ways of spelling a leading space.
"""

from __future__ import annotations

import string
from pathlib import Path

from etbench.task.prompts import LABELS, generate, paper_objects

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def _corpus(n: int = 300) -> list[str]:
    sentences = []
    for n_boxes in (2, 3, 5, 7):
        sentences += [ex.sentence for ex in generate(n_boxes=n_boxes, n=n, seed=123)]
    # Every object and label at least once in each role, so BPE merges them into whole tokens.
    sentences += [f"The {o} is in Box {L}. Box {L} contains the {o}." for o in paper_objects() for L in "AB"]
    sentences += [f"The book is in Box {L}, the car is in Box {L}. Box {L} contains the car." for L in LABELS]
    return sentences


def word_level_tokenizer(objects: list[str] | None = None, bos: bool = True):
    """Whitespace/punctuation word-level tokenizer over the template's words.

    ``objects`` limits the object vocabulary (objects outside it become ``<unk>``), which is how
    tests build a tokenizer where some objects are not single tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["The", "the", "is", "in", "Box", "contains", "There", "there", "are", "a", "bunch", "of",
             "boxes", "containing", "objects", "these", "not", "contained", "three", "additional",
             "and", "PP", "BB", "AA", ",", "."]
    vocab_words = list(SPECIALS) + words + list(string.ascii_uppercase)
    vocab_words += [o for o in (paper_objects() if objects is None else objects) if o not in vocab_words]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def byte_level_bpe_tokenizer(vocab_size: int = 600):
    """A GPT-2-style byte-level BPE trained on template sentences (no BOS, like GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_llama(vocab_size: int, n_layers: int = 2, n_heads: int = 4, d_model: int = 64, seed: int = 0,
               n_kv_heads: int | None = None):
    """A random-weight LlamaForCausalLM small enough for unit tests (~0.1 M parameters); ``n_kv_heads`` (default
    ``n_heads``) fewer than the heads gives grouped-query attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
                         num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads or n_heads,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return LlamaForCausalLM(config).eval()


def save_toy_model(directory: str | Path, seed: int = 0) -> Path:
    """Write a random tiny Llama + word-level tokenizer that ``from_pretrained`` loads offline."""
    directory = Path(directory)
    tokenizer = word_level_tokenizer()
    model = tiny_llama(len(tokenizer), seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
