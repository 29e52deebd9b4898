"""A small byte-level BPE ``CLIPTokenizer``, generated locally (no download).

The vocabulary is in CLIP's layout (bytes, bytes + ``</w>``, merges, special tokens) over a word list, each word of
which becomes one token: the default words of the random-weight pipelines, or a caller's (the embedded shapes
model's caption grammar). The merges are learnt by plain Sennrich BPE with ties broken by the symbol pair itself
(`_learn_bpe_merges`).

The files must stay byte-identical (tests/test_tokenizer_files.py): the shapes model's text encoder was trained on
these token ids. That is why the trainer is this one and not `tokenizers`' ``BpeTrainer``: between pairs of equal
count, ``BpeTrainer`` merges the pair of smaller token ids (a merged token's id is its creation order) where this
trainer takes the smaller pair of strings, so its merges, and the ids, differ from the first tie on (for the
grammar: ``b l`` before ``an g``).
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from .configs import MODEL_MAX_LENGTH

# Words that get a whole-word token.  Chosen for image-editing prompts; anything
# else still tokenizes, falling back to sub-words and finally to single bytes.
_WORDS = """
a an the of in on at to for with by from and or but not no is are was were be been
it its this that these those there here as into onto over under near behind above
below between through up down out off around inside outside across along before after
one two three four five many some all every each very more most much other another same
different half top bottom left right front back side center middle has have had do does
did can will would should could may might must make change turn add remove replace keep
edit become made into while when where what who which how than then so too also just only
cabin house home city street road bridge river lake sea ocean beach coast wave waves
mountain mountains hill hills forest woods wood tree trees flower flowers garden field
grass sky cloud clouds sun moon star stars night day morning evening sunset sunrise rain
snow ice winter summer spring autumn fall water fire smoke light lights shadow shadows
window door room wall floor table chair bed kitchen car cars boat ship train plane bus
bike bird birds dog dogs cat cats horse horses fish cow sheep lion tiger bear wolf fox
rabbit deer man woman men women boy girl child children person people face eyes hair
hand hands head portrait photo photograph picture painting drawing sketch image art
artwork style red orange yellow green blue purple pink brown black white gray grey gold
golden silver dark bright old new young big small large little tall long short
beautiful pretty cute happy sad wooden stone glass metal snowy sunny rainy foggy misty
cloudy stormy calm quiet warm cold hot high low soft hard detailed realistic
photorealistic cinematic dramatic colorful vibrant sharp blurry wet dry empty full
sitting standing walking running flying swimming looking wearing holding playing eating
reading smiling oil watercolor digital render rendering lighting anime cartoon comic
pixel vintage retro modern futuristic ancient medieval fantasy magic magical castle
tower village town market shop cafe restaurant church temple palace ruins desert island
jungle valley canyon waterfall cave volcano path trail fence farm barn hat dress shirt
coat jacket shoes glasses robot astronaut king queen knight dragon spaceship planet space
galaxy universe earth world nature landscape scene view background foreground camera
lens closeup close wide angle shot quality best masterpiece resolution hd detail details
texture colors color painted style studio cozy lamp candle street neon cyberpunk
steampunk sculpture statue marble bronze paper fabric leather sand rock rocks cliff
shore harbor lighthouse pier dock boats sails sail storm thunder lightning rainbow
fireworks lantern lanterns festival crowd party dancing music guitar piano book books
library school office building buildings skyscraper skyline apartment roof chimney
smoke garden park bench fountain pond swan duck ducks frog butterfly bee flowers rose
roses tulip tulips sunflower sunflowers leaves leaf branch branches moss fern pine oak
maple palm cactus bamboo vines autumnal spooky haunted ghost witch wizard elf fairy
princess prince warrior soldier pirate cowboy chef doctor teacher student old elderly
baby toddler family friends couple wedding smile laughing crying angry surprised
""".split()

_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode mapping, in CLIP's order.

    Byte-level BPE works on these 256 symbols instead of raw bytes so that every
    byte (hence every input string) has a token and no unknown token ever appears.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, int] = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = 256 + extra
            extra += 1
    order = printable + [b for b in range(256) if b not in printable]
    return [chr(mapping[b]) for b in order]


@functools.lru_cache(maxsize=4)
def _learn_bpe_merges(word_list: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Learn BPE merges that turn each word of ``word_list`` into a single token.

    Plain Sennrich BPE over the word list (every word counted once): repeatedly
    merge the most frequent adjacent symbol pair, ties broken by the pair itself so
    the result is deterministic, until every word is one symbol.  Because encoding
    applies merges in the same order, each listed word then encodes to one token,
    and frequent sub-words (``ing``, ``th`` ...) get tokens along the way.  Words are
    ASCII lower case, whose bytes map to themselves in the byte-level alphabet.
    """
    words = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in dict.fromkeys(word_list)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for word in words:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return tuple(merges)
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        words = [_apply_merge(word, best) for word in words]


def _apply_merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Merge every left-to-right occurrence of ``pair`` in ``word``."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _tokenizer_vocab(words: tuple[str, ...] | None = None) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Build the vocabulary in CLIP's layout: bytes, bytes+``</w>``, merges, specials.

    ``words``: the whole-word tokens (lower-case ASCII); ``None``: the default ``_WORDS``.
    """
    byte_symbols = _bytes_to_unicode()
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges = _learn_bpe_merges(tuple(_WORDS if words is None else words))
    tokens += ["".join(pair) for pair in merges]
    tokens += list(_SPECIAL_TOKENS)
    # Two different merges can produce the same string (ab+c, a+bc); keep the first id.
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_tokenizer_files(
    directory: str | Path,
    words: list[str] | tuple[str, ...] | None = None,
    model_max_length: int = MODEL_MAX_LENGTH,
) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` for a small CLIP BPE.

    The files are in the format of ``openai/clip-vit-large-patch14``'s slow
    tokenizer files, so ``CLIPTokenizer.from_pretrained(directory)`` loads them
    with any transformers version.  ``words`` (lower-case ASCII) each become one
    token; ``None`` keeps the default vocabulary of the random pipelines.
    ``model_max_length`` is the context length prompts are padded / truncated to.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tokenizer_vocab(None if words is None else tuple(words))
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": _SPECIAL_TOKENS[0],
        "eos_token": _SPECIAL_TOKENS[1],
        "unk_token": _SPECIAL_TOKENS[1],
        "pad_token": _SPECIAL_TOKENS[1],
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    return directory


def random_tokenizer() -> CLIPTokenizer:
    """Build a small byte-level BPE ``CLIPTokenizer`` (context length 77) without downloads.

    The vocabulary files are written to a temporary directory that is deleted once
    the tokenizer is loaded (the tokenizer keeps everything in memory).
    """
    with tempfile.TemporaryDirectory(prefix="fisedit_clip_tok_") as tmp:
        write_tokenizer_files(tmp)
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True, model_max_length=MODEL_MAX_LENGTH)
