"""Align the tokens of an edited prompt with the source prompt's (for cross-attention control).

    source  <bos> a cabin in the woods <eos> <pad> ...
    edited  <bos> a cabin in the woods with a river <eos> <pad> ...
    ->      [0, 1, 2, 3, 4, 5, -1, -1, -1, 6, 7, ...]     (-1: a new token, whose attention stays fresh)

Words are matched with difflib's longest-matching-blocks alignment, so swaps, insertions and deletions all align;
a run of swapped tokens as long as the run it replaces takes its counterparts' maps (Prompt-to-Prompt's word swap:
"red" -> "blue" attends where "red" did); the end-of-text and padding positions after each prompt are paired in
order. `swaps_words_only` tells a word swap (every change replaces words) from an edit that inserts or deletes
words, which control calls treat differently (`ControlMode.hold_layout`).
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
    for tag, a0, a1, b0, b1 in _opcodes(src, new):
        if tag == "equal" or (tag == "replace" and a1 - a0 == b1 - b0):
            for offset in range(b1 - b0):
                alignment[1 + b0 + offset] = 1 + a0 + offset
    # end-of-text and padding: the i-th position after each prompt's words
    for position in range(len(new) - 1, length):
        source_position = position - len(new) + len(src)
        if source_position < length:
            alignment[position] = source_position
    return alignment


def _opcodes(source_ids: list[int], edited_ids: list[int]) -> list[tuple[str, int, int, int, int]]:
    """difflib's opcodes between the two prompts' tokens, start and end tokens left out."""
    matcher = difflib.SequenceMatcher(a=source_ids[1:-1], b=edited_ids[1:-1], autojunk=False)
    return matcher.get_opcodes()


def swaps_words_only(tokenizer, source: str, edited: str) -> bool:
    """Whether `edited` differs from `source` and only by replacing words ("a red circle" -> "a blue circle",
    "... on a gray background" -> "... on a black background"), none inserted or deleted."""
    tags = {tag for tag, *_ in _opcodes(token_ids(tokenizer, source), token_ids(tokenizer, edited))}
    return "replace" in tags and tags <= {"equal", "replace"}
