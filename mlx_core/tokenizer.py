"""Mistral's sentencepiece tokenizer: text <-> ids, the v1 chat format, streaming detokenization.

Ground truth is the `sentencepiece` library on the model's own tokenizer.model, which is what
mistral-common and mistral-inference use; tests/engine/test_tokenizer.py holds this module to it, to
transformers and to mistral-common's v1 chat encoding.
"""

from __future__ import annotations

import codecs
import hashlib
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from mlx_core.errors import LoraforgeError

TOKENIZER_FILE = "tokenizer.model"
CHAT_ROLES = ("system", "user", "assistant")
_ANCHOR_PIECE = "▁a"  # a plain piece with a leading space: what tells whether text has begun

# Tokenizer.appended_texts by the sentencepiece model's bytes: many Tokenizer objects (one per
# loaded model, several in a test run) share one model; the table takes ~0.2 s for 32,000 ids.
_APPENDED_TEXTS: dict[bytes, tuple[str | None, ...]] = {}
_APPENDED_LOCK = threading.Lock()

# `encode_chat` as a Jinja chat template (Hugging Face's convention: `messages`, `bos_token`,
# `eos_token`, `raise_exception`), for clients that format chats themselves (vLLM's
# /tokenizer_info serves it). Rendered, then encoded with special_texts=True, it gives encode_chat's
# ids: each text between "<s>"/"</s>" gets sentencepiece's "▁" of its own, which is why "[INST]"
# follows "</s>" with no space (Mistral's hub template writes " [INST] " for a tokenizer that adds
# none after special tokens). Leading system messages join the first user message, as there.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- set ns = namespace(system='', turn=0) %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and ns.turn == 0 %}"
    "{%- if message['content'] %}"
    "{%- set ns.system = ns.system + '\n\n' + message['content'] if ns.system"
    " else message['content'] %}"
    "{%- endif %}"
    "{%- else %}"
    "{%- if (message['role'] == 'user') != (ns.turn % 2 == 0) %}"
    "{{- raise_exception('after any system messages, roles must alternate user/assistant"
    " starting with user') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if ns.turn == 0 and ns.system %}"
    "{{- '[INST] ' + ns.system + '\n\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- set ns.turn = ns.turn + 1 %}"
    "{%- endif %}"
    "{%- endfor %}"
)


class TokenizerError(LoraforgeError):
    """A tokenizer file is missing, unreadable or does not fit the model; the message says why."""


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


class Tokenizer:
    """Text <-> ids with one sentencepiece model (Mistral-7B: 32000 ids, BOS 1, EOS 2)."""

    def __init__(self, path: Path, processor: spm.SentencePieceProcessor) -> None:
        self.path = path
        self._sp = processor
        self.vocab_size: int = processor.vocab_size()
        self.bos_id: int = processor.bos_id()
        self.eos_id: int = processor.eos_id()
        self.unk_id: int = processor.unk_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(
                f"{path} defines no BOS/EOS token, which Mistral models need: use the "
                "tokenizer.model that ships with the model's weights"
            )
        # Byte-fallback pieces <0x00>..<0xFF> carry raw UTF-8 bytes of characters outside the
        # vocabulary (many emoji): the detokenizer must not emit half a character, and token_text
        # shows a lone byte the way OpenAI does.
        self._byte_of: dict[int, int] = {}
        for value in range(256):
            token_id = processor.piece_to_id(f"<0x{value:02X}>")
            if processor.is_byte(token_id):
                self._byte_of[token_id] = value
        # "<unk>", "<s>", "</s>": the texts encode(special_texts=True) reads as their ids.
        self._special_ids: dict[str, int] = {
            processor.id_to_piece(i): i
            for i in range(self.vocab_size)
            if processor.is_control(i) or processor.is_unknown(i)
        }
        longest_first = sorted(self._special_ids, key=len, reverse=True)
        self._appended: tuple[str | None, ...] | None = None  # appended_texts(), built on first use
        self._anchor = processor.piece_to_id(_ANCHOR_PIECE)  # unknown in a vocabulary without it
        self._special_split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """The tokenizer of a model folder, read from folder/tokenizer.model."""
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(_missing_file_message(folder))
        return cls.from_file(path)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """The tokenizer stored in one sentencepiece model file."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(
                f"no tokenizer file at {path}: pass the path of the model's tokenizer.model "
                "(Mistral-7B ships one next to its weights)"
            )
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as err:  # sentencepiece reports a bad proto as RuntimeError
            raise TokenizerError(
                f"{path} is not a sentencepiece model ({err}): replace it with the model's "
                "original tokenizer.model (a Hugging Face tokenizer.json alone cannot be read)"
            ) from err
        return cls(path, processor)

    def encode(
        self, text: str, add_bos: bool = True, add_eos: bool = False, special_texts: bool = False
    ) -> list[int]:
        """Token ids of `text`, optionally wrapped in BOS/EOS.

        Text such as "<s>" or "</s>" stays literal text: sentencepiece never produces control ids
        from input, so a prompt cannot smuggle in an end-of-sequence. special_texts=True reads
        "<s>", "</s>" and "<unk>" as their ids instead, as Hugging Face tokenizers do (clients
        such as lm-eval find the EOS id by encoding "</s>"); the texts between them encode as
        they would alone, so text without them gets the same ids either way.
        """
        ids: list[int] = []
        if special_texts:
            for part in self._special_split.split(text):
                if part in self._special_ids:
                    ids.append(self._special_ids[part])
                elif part:
                    ids += self._sp.encode(part)
        else:
            ids = self._sp.encode(text)
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; BOS, EOS and other control ids contribute nothing.

        Like sentencepiece (and mistral-common), the space of a leading "▁" at the start is dropped.
        """
        ids = [int(i) for i in ids]  # numpy/MLX integers from the sampler
        try:
            return self._sp.decode(ids)
        except IndexError:
            raise self._unknown_id(next(i for i in ids if not 0 <= i < self.vocab_size)) from None

    def token_text(self, token_id: int) -> str:
        """What one token shows as text, for logprobs: "▁the" -> " the", "<0x0A>" -> "\\n".

        A byte-fallback token that is only part of a UTF-8 character reads "bytes:\\xe4", as in
        OpenAI's and vLLM's logprobs; control tokens read as their piece ("</s>").
        """
        if not 0 <= token_id < self.vocab_size:
            raise self._unknown_id(token_id)
        piece = self._sp.id_to_piece(token_id)
        byte = self._byte_of.get(token_id)
        if byte is not None:
            return chr(byte) if byte < 0x80 else f"bytes:\\x{byte:02x}"
        if self._sp.is_control(token_id) or self._sp.is_unknown(token_id):
            return piece
        return piece.replace("▁", " ")

    def piece(self, token_id: int) -> str:
        """The token's sentencepiece piece, as Hugging Face's convert_ids_to_tokens gives it
        ("▁the", "<0x0A>", "</s>")."""
        if not 0 <= token_id < self.vocab_size:
            raise self._unknown_id(token_id)
        return self._sp.id_to_piece(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token contributes (OpenAI's logprobs `bytes` field)."""
        byte = self._byte_of.get(token_id)
        return bytes([byte]) if byte is not None else self.token_text(token_id).encode()

    def appended_texts(self) -> tuple[str | None, ...]:
        """Per id, the text the token adds after text that has begun: its piece with "▁" read as a
        space (an ASCII byte-fallback id: its character); None for control and unknown ids, the
        bytes of longer characters and any id that fails the check below, which the streaming
        detokenizer then decodes in a window (all ids, when the table is empty: a vocabulary
        without the piece "▁a" to check with). Each id is checked against sentencepiece itself:
        after a plain piece it must add exactly that text, and a leading-space piece after it
        must keep its space (so the id alone begins the text)."""
        if self._appended is None:
            key = hashlib.sha256(self._sp.serialized_model_proto()).digest()
            with _APPENDED_LOCK:
                if (texts := _APPENDED_TEXTS.get(key)) is None:
                    texts = _APPENDED_TEXTS[key] = self._appended_texts()
            self._appended = texts
        return self._appended

    def begins_text(self, ids: Sequence[int]) -> bool:
        """Whether `ids` decode as text that has begun: a leading-space piece after them keeps its
        space (after nothing, or only control ids, decode drops it)."""
        return bool(ids) and self.decode([*ids, self._anchor]) == self.decode(ids) + " a"

    def _appended_texts(self) -> tuple[str | None, ...]:
        sp, anchor = self._sp, self._anchor
        if sp.is_unknown(anchor):  # a vocabulary without it: every token takes the window path
            return ()
        base = sp.decode([anchor])
        texts: list[str | None] = []
        for i in range(self.vocab_size):
            byte = self._byte_of.get(i)
            if sp.is_control(i) or sp.is_unknown(i) or (byte is None and sp.is_byte(i)):
                texts.append(None)
                continue
            if byte is not None:  # an ASCII byte is a whole character ("\n" is one in Mistral's)
                if byte >= 0x80:
                    texts.append(None)
                    continue
                text = chr(byte)
            else:
                text = sp.id_to_piece(i).replace("▁", " ")
            ok = sp.decode([anchor, i]) == base + text and self.begins_text([i])
            texts.append(text if ok else None)
        return tuple(texts)

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for one generated sequence.

        Pass `prompt_ids` when the output continues the prompt's text (completions): the first
        token then keeps its space, "...France is" -> " Paris". Leave it out for chat replies,
        which start a new turn and, as mistral-common decodes them, drop that space.
        """
        return StreamingDetokenizer(self, prompt_ids)

    def encode_chat(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation in the Mistral-7B-Instruct-v0.1 ("v1") format.

        `<s>[INST] {system}\\n\\n{user} [/INST]{assistant}</s>[INST] {user} [/INST]`, id for id
        what mistral-common's `MistralTokenizer.v1()` produces: each [INST] block and each answer
        is encoded on its own, so each starts with sentencepiece's "▁" (decoded: "<s> [INST] ...
        [/INST] answer</s> [INST] ..."). Leading system messages join the first user message.
        With add_generation_prompt=False a final assistant message is allowed and ends with EOS,
        and encode_chat(messages[:-1]) is then a prefix of the result (the prompt to mask).
        Raises ValueError, saying how to fix the conversation, when roles do not alternate.
        """
        system, turns = _chat_turns(messages, add_generation_prompt)
        ids = [self.bos_id]
        for index, message in enumerate(turns):
            if message.role == "user":
                content = message.content
                if index == 0 and system:
                    content = f"{system}\n\n{content}"
                ids += self._sp.encode(f"[INST] {content} [/INST]")
            else:
                ids += self._sp.encode(message.content)
                ids.append(self.eos_id)
        return ids

    def _unknown_id(self, token_id: int) -> TokenizerError:
        return TokenizerError(
            f"token id {token_id} is outside the vocabulary of {self.path} "
            f"({self.vocab_size} ids): the model and its tokenizer.model do not match; use the "
            "tokenizer.model shipped with these weights"
        )


class StreamingDetokenizer:
    """Turns generated ids into text as they arrive, one add() per token.

    Decoding each token alone would lose the space sentencepiece keeps as a leading "▁" (decode
    drops it at the start of a text) and would split characters that byte fallback spreads over
    several tokens. So, like the incremental detokenizers of HF and vLLM, it decodes a short window,
    the last emitted group of tokens plus the new ones, and emits what the new ones add; the window
    restarts after each emission, so the work per token does not grow with the text. Most tokens
    skip even that: once text has begun and nothing is held back, a plain piece adds exactly its
    own text (`Tokenizer.appended_texts`, checked against sentencepiece), a table lookup instead
    of two decodes, which at 32 rows is host time taken from every batched step.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self._tokenizer = tokenizer
        self._appended = tokenizer.appended_texts()
        # With the prompt's last token in the window, the first generated token reads as it does
        # after the prompt. (A lone continuation byte there decodes to the same U+FFFD both times.)
        self._window = [int(i) for i in prompt_ids[-1:]]
        self._read = len(self._window)  # window[:read] is text already emitted (or prompt)
        self._begun = self._has_begun()

    def add(self, token_id: int) -> str:
        """The text this token completes; "" while it is part of an unfinished character."""
        token_id = int(token_id)
        self.tokens.append(token_id)
        if self._begun and self._read == len(self._window) and 0 <= token_id < len(self._appended):
            text = self._appended[token_id]
            if text is not None:  # the id alone now begins the window (appended_texts checks it)
                self._window = [token_id]
                self._read = 1
                self.text += text
                return text
        self._window.append(token_id)
        if _ends_mid_character(self._tokenizer, self._window):
            return ""
        return self._emit()

    def flush(self) -> str:
        """What is held back at the end of the sequence (an unfinished character reads U+FFFD)."""
        return self._emit()

    def _emit(self) -> str:
        before = self._tokenizer.decode(self._window[: self._read])
        after = self._tokenizer.decode(self._window)
        if len(after) <= len(before):  # only control tokens since the last emission: keep waiting
            return ""
        new_text = after[len(before) :]
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._begun = self._has_begun()
        self.text += new_text
        return new_text

    def _has_begun(self) -> bool:
        """Whether the emitted window has begun the text, so that a piece's leading "▁" after it
        reads as a space (after nothing, or only control tokens, decode drops it)."""
        return bool(self._appended) and self._tokenizer.begins_text(self._window[: self._read])


def _ends_mid_character(tokenizer: Tokenizer, ids: list[int]) -> bool:
    """Whether the trailing byte-fallback tokens are a valid but unfinished UTF-8 character.

    Invalid bytes are not waited for: nothing could complete them, and decode shows U+FFFD.
    """
    tail = bytearray()
    for token_id in reversed(ids[-4:]):  # a UTF-8 character is at most 4 bytes
        byte = tokenizer._byte_of.get(token_id)
        if byte is None:
            break
        tail.insert(0, byte)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(bytes(tail))
    return bool(decoder.getstate()[0])  # bytes kept back waiting for the rest of a character


def _chat_turns(
    messages: Sequence[ChatMessage], add_generation_prompt: bool
) -> tuple[str, list[ChatMessage]]:
    """The system prompt and the alternating user/assistant turns; ValueError says what to fix."""
    lead = 0
    while lead < len(messages) and messages[lead].role == "system":
        lead += 1
    # As mistral-common does: several system messages join with a blank line, empty ones vanish.
    system = "\n\n".join(m.content for m in messages[:lead] if m.content)
    turns = list(messages[lead:])
    if not turns:
        raise ValueError("the conversation has no user message: add one after the system messages")
    for index, message in enumerate(turns, start=lead):
        expected = "user" if (index - lead) % 2 == 0 else "assistant"
        if message.role not in CHAT_ROLES:
            raise ValueError(
                f"messages[{index}] has role {message.role!r}: the Mistral v1 chat format knows "
                "only system, user and assistant"
            )
        if message.role == "system":
            raise ValueError(
                f"messages[{index}] is a system message after the conversation started: move it to "
                "the start, where it joins the first user message"
            )
        if message.role != expected:
            raise ValueError(
                f"messages[{index}] is {message.role!r} where {expected!r} was expected: after any "
                "system messages, roles must alternate user/assistant starting with user; merge "
                "consecutive messages of one role"
            )
        if message.role == "assistant" and not message.content:
            raise ValueError(
                f"messages[{index}] is an empty assistant message: give it text, or drop it with "
                "the user message before it"
            )
    if add_generation_prompt and turns[-1].role != "user":
        raise ValueError(
            "the conversation ends with an assistant message, so there is nothing to answer: end "
            "with a user message, or pass add_generation_prompt=False to encode a finished "
            "conversation (training data)"
        )
    return system, turns


def _missing_file_message(folder: Path) -> str:
    message = (
        f"no tokenizer.model in {folder}: copy the model's tokenizer.model there (Mistral-7B ships "
        "one next to its weights)"
    )
    if not folder.is_dir():
        return f"{message}; the folder itself does not exist, so check the --model path"
    if others := sorted(p.name for p in folder.glob("tokenizer*")):
        message += f"; found {', '.join(others)}: copy a sentencepiece file such as "
        message += "tokenizer.model.v1 to tokenizer.model (a tokenizer.json alone cannot be used)"
    return message
