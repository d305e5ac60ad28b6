"""A word-level tokenizer: prompts to the fixed-length arrays of token ids that the text encoder reads.

Image tools split prompts into sub-word pieces (CLIP's byte-pair encoding has
49,408 of them); the captions here come from a grammar of a few dozen words
(``diffusion.captions``), so one token per word is enough and every token can
be read back. A prompt is

1. normalised: lower-cased, punctuation turned into spaces, and each numeral
   0-9 written as its word ("7" and "seven" are one token);
2. split into words, each looked up in the vocabulary (an unknown word is an
   error that lists the nearest known ones);
3. padded with ``<pad>`` (id 0) to ``max_tokens`` (a longer prompt is an
   error that says the limit).

The empty prompt "" is the single token ``<empty>``: the condition that
training puts in place of a caption now and then (prompt dropout), and the
unconditional branch of classifier-free guidance. It is a real token rather
than all padding so that attention always has a key to attend to.
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import NamedTuple

import numpy as np

from diffusion import captions
from diffusion.errors import InputError

PAD, EMPTY = "<pad>", "<empty>"
PAD_ID = 0
MAX_TOKENS = 8  # the longest caption has 6 words ("a small bold seven leaning left")


def caption_words() -> tuple[str, ...]:
    """Every word the captions of ``diffusion.captions`` can use, sorted."""
    words = {"a", "an", *captions.DIGIT_WORDS}
    for phrasings in captions.PHRASES.values():
        for phrases in phrasings.values():
            words.update(word for phrase in phrases for word in phrase.split())
    return tuple(sorted(words))


@functools.cache
def _index(vocabulary: tuple[str, ...]) -> dict[str, int]:
    """{word: id}, built once per vocabulary (encoding runs for every caption of every training step)."""
    return {word: i for i, word in enumerate(vocabulary)}


class Tokenizer(NamedTuple):
    """The vocabulary (``vocabulary[i]`` is token i; 0 is ``<pad>``, 1 ``<empty>``) and the padded length."""

    vocabulary: tuple[str, ...]
    max_tokens: int = MAX_TOKENS

    @property
    def empty_ids(self) -> np.ndarray:
        """The ids of the empty prompt."""
        return self.encode("")

    def words(self, prompt: str) -> list[str]:
        """The normalised words of ``prompt``: lower case, no punctuation, numerals as words."""
        if not isinstance(prompt, str):
            raise InputError(f"a prompt is text (got {type(prompt).__name__})")
        words = re.sub(r"[^\w\s]|_", " ", prompt.lower()).split()
        return [captions.DIGIT_WORDS[int(w)] if w.isdigit() and len(w) == 1 else w for w in words]

    def encode(self, prompt: str) -> np.ndarray:
        """The prompt as ``max_tokens`` int32 ids, padded with 0; "" is ``<empty>``."""
        words = self.words(prompt) or [EMPTY]
        index = _index(self.vocabulary)
        for word in words:
            if word not in index:
                known = [w for w in self.vocabulary if w not in (PAD, EMPTY)]
                near = difflib.get_close_matches(word, known, n=3, cutoff=0.6)
                hint = f"did you mean {' or '.join(near)}?" if near else f"the words it knows: {', '.join(known)}"
                raise InputError(f"the prompt {prompt!r} has the word {word!r}, which this model does not know; {hint}")
        if len(words) > self.max_tokens:
            raise InputError(
                f"the prompt {prompt!r} has {len(words)} words; this model reads at most {self.max_tokens}"
            )
        ids = np.full(self.max_tokens, PAD_ID, np.int32)
        ids[: len(words)] = [index[word] for word in words]
        return ids

    def encode_all(self, prompts) -> np.ndarray:
        """Several prompts, shape (len(prompts), max_tokens)."""
        return np.stack([self.encode(p) for p in prompts]) if len(prompts) else np.zeros((0, self.max_tokens), np.int32)

    def decode(self, ids) -> str:
        """The words of ``ids`` without the padding ("" for the empty prompt)."""
        words = [self.vocabulary[int(i)] for i in np.asarray(ids) if int(i) != PAD_ID]
        return "" if words == [EMPTY] else " ".join(words)


def caption_tokenizer(max_tokens: int = MAX_TOKENS) -> Tokenizer:
    """The tokenizer of the captions' vocabulary: ``<pad>``, ``<empty>``, then ``caption_words()``."""
    return Tokenizer((PAD, EMPTY, *caption_words()), max_tokens)
