"""The tokenizer files `models.write_tokenizer_files` writes are the ones the shipped models were made with.

`tests/data/tokenizer/` holds the vocab.json and merges.txt written before the models package was split: `default`
(the random-weight pipelines' words) and `grammar` (`training.shapes.GRAMMAR_WORDS`, the embedded shapes model's
tokenizer, whose text encoder was trained on these token ids). Any change to the BPE trainer or the vocabulary
layout would change the ids these models read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fisedit_compiler.models import write_tokenizer_files
from fisedit_compiler.training.shapes import GRAMMAR_WORDS

DATA = Path(__file__).resolve().parent / "data" / "tokenizer"


@pytest.mark.parametrize("name, words", [("default", None), ("grammar", GRAMMAR_WORDS)])
@pytest.mark.parametrize("file", ["vocab.json", "merges.txt"])
def test_tokenizer_files_are_byte_identical_to_the_saved_ones(tmp_path, name, words, file):
    write_tokenizer_files(tmp_path, words=words)
    assert (tmp_path / file).read_bytes() == (DATA / name / file).read_bytes()


def test_each_grammar_word_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(tmp_path, words=GRAMMAR_WORDS))
    assert all(len(tokenizer.tokenize(word)) == 1 for word in GRAMMAR_WORDS)
