"""Align the tokens of an edited prompt with the source prompt's (for cross-attention control).

    source  <bos> a cabin in the woods <eos> <pad> ...
    edited  <bos> a cabin in the woods with a river <eos> <pad> ...
    ->      [0, 1, 2, 3, 4, 5, -1, -1, -1, 6, 7, ...]     (-1: a new token, whose attention stays fresh)

Words are matched with difflib's longest-matching-blocks alignment, so swaps, insertions and deletions all align;
the end-of-text and padding positions after each prompt are paired in order.
"""

from __future__ import annotations

import difflib

import torch


class PromptTooLongError(ValueError):
    """A prompt that the tokenizer would truncate."""


def token_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids with start and end tokens; raises PromptTooLongError if it would be truncated."""
    ids = tokenizer(prompt, truncation=False, verbose=False).input_ids  # a too long prompt is our error, below
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        raise PromptTooLongError(
            f"prompt {prompt[:40]!r}... is {len(ids)} tokens long but the text encoder takes at most {limit} "
            "(including start and end tokens): shorten it"
        )
    return ids


def align_tokens(tokenizer, source: str, edited: str) -> torch.Tensor:
    """For each token position of `edited` (padded to the tokenizer's length), the position of the same token in
    `source`, or -1 for a token that `source` does not have."""
    length = tokenizer.model_max_length
    src, new = token_ids(tokenizer, source), token_ids(tokenizer, edited)
    alignment = torch.full((length,), -1, dtype=torch.long)
    alignment[0] = 0  # start token
    matcher = difflib.SequenceMatcher(a=src[1:-1], b=new[1:-1], autojunk=False)
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            alignment[1 + block.b + offset] = 1 + block.a + offset
    # end-of-text and padding: the i-th position after each prompt's words
    for position in range(len(new) - 1, length):
        source_position = position - len(new) + len(src)
        if source_position < length:
            alignment[position] = source_position
    return alignment
