"""Token healing: a prompt that ends inside what the model would write as one token.

"...A: " ends in a lone "▁" token, which the model rarely sees before a word: it writes " Paris"
as one token "▁Paris". Healing backs off that last prompt token and makes the first generated
token(s) spell its bytes again, so "...A: " and "...A:" give the same answer. The caller strips
the backed-off text from what it returns (`PrefixStripper`). Works on our byte table alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .matcher import pack_bitmask
from .vocab import Vocabulary


@dataclass(frozen=True)
class Healing:
    """The prompt to run and the text its generation must start with."""

    prompt: list[int]  # the prompt without the backed-off tokens
    prefix: bytes  # their bytes (b"" when nothing was backed off); valid UTF-8
    backed_off: int = 0  # how many prompt tokens were backed off

    @property
    def text(self) -> str:
        return self.prefix.decode()


def heal_prompt(prompt: Sequence[int], vocab: Vocabulary, max_tokens: int = 1) -> Healing:
    """Back off up to `max_tokens` trailing prompt tokens whose text a longer token extends.

    A tail is backed off only when some vocabulary token starts with its bytes and is longer
    (otherwise the model could only write it the same way again), when it is text (no BOS/EOS,
    whole UTF-8 characters) and when a text token stays before it (so the detokenizer keeps
    the prefix's leading space). Use it for completions, not chat prompts: a chat prompt ends
    with the template's "[/INST]", after which the model starts a new token anyway.
    """
    prompt = [int(t) for t in prompt]
    best = Healing(prompt, b"")
    for k in range(1, max_tokens + 1):
        if len(prompt) - k < 1 or prompt[-k - 1] in vocab.special_ids:
            break
        if prompt[-k] in vocab.special_ids:
            break
        tail = b"".join(vocab.token_bytes[t] for t in prompt[-k:])
        try:
            tail.decode()
        except UnicodeDecodeError:
            continue  # half a character: a longer tail may complete it
        if any(len(vocab.token_bytes[i]) > len(tail) for i in vocab.ids_starting_with(tail)):
            best = Healing(prompt[:-k], tail, k)
    return best


class HealingMatcher:
    """Constrains the first generated tokens to spell `prefix`: each must start with what is left
    of it, or be a (non-empty) beginning of it. Inactive once the prefix is spelled."""

    def __init__(self, prefix: bytes, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.remaining = prefix

    @property
    def active(self) -> bool:
        return bool(self.remaining)

    def allowed_mask(self) -> np.ndarray:
        """Allowed next tokens as bool (vocab.size,); all True once the prefix is spelled."""
        allowed = np.zeros(self.vocab.size, dtype=bool)
        if not self.remaining:
            allowed[:] = True
            return allowed
        allowed[self.vocab.ids_starting_with(self.remaining)] = True
        for n in range(1, len(self.remaining)):
            allowed[self.vocab.ids_of_bytes.get(self.remaining[:n], [])] = True
        return allowed

    def fill_bitmask(self, out: np.ndarray) -> None:
        pack_bitmask(self.allowed_mask(), out)

    def advance(self, token_id: int) -> bool:
        piece = self.vocab.token_bytes[int(token_id)]
        if not self.remaining:
            return True
        if piece.startswith(self.remaining):
            self.remaining = b""
        elif piece and self.remaining.startswith(piece):
            self.remaining = self.remaining[len(piece) :]
        else:
            return False
        return True

    def is_stopped(self) -> bool:
        return False

    def is_accepting(self) -> bool:
        return not self.remaining


class PrefixStripper:
    """Drops the healed prefix from the front of a row's streamed text."""

    def __init__(self, prefix: str) -> None:
        self.left = len(prefix)

    def feed(self, text: str) -> str:
        """The part of `text` after the prefix ("" while the prefix is still arriving)."""
        cut = min(self.left, len(text))
        self.left -= cut
        return text[cut:]
