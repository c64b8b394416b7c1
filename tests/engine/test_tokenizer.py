"""mlx_core.tokenizer against three references, on Mistral-7B-v0.1's real tokenizer.model.

1. `sentencepiece` itself: the ground truth (mistral-common and mistral-inference call it).
2. transformers 5.24. Its `LlamaTokenizer`, the class Mistral's tokenizer_config.json names, is a
   `tokenizers` BPE with a Metaspace pre-tokenizer in this version (the sentencepiece-based
   "slow" LlamaTokenizer is gone; `LlamaTokenizer(vocab_file=...)` silently builds an empty
   vocabulary, only `from_pretrained` converts the file).
   It disagrees with sentencepiece on leading spaces and on runs of spaces, whatever `legacy` is:
   `test_transformers_llama_tokenizer_differs_only_on_spaces` pins exactly where. What reproduces
   Mistral's tokenizer id for id is the conversion transformers applies to a bare sentencepiece
   file: `TokenizersBackend.from_pretrained(folder with tokenizer.model, legacy=True,
   add_bos_token=True)`; encode it with `split_special_tokens=True` so "<s>" in text stays text,
   as in sentencepiece. For chat, that backend with legacy=False and the chat template Mistral
   aligned with mistral-common (" [INST] " ... " [/INST]", " " + answer + "</s>") gives the
   same ids as mistral-common.
3. mistral-common 1.13: `SentencePieceTokenizer` for plain text, `MistralTokenizer` (v1) for chats.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import random
import shutil
from pathlib import Path

import jinja2.sandbox
import pytest
import sentencepiece as spm
import transformers
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from mlx_core.tokenizer import CHAT_TEMPLATE, ChatMessage, Tokenizer, TokenizerError

MISTRAL_V1 = Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))

CORPUS = [
    "",
    "Hello world",
    " leading space",
    "   three leading spaces",
    "multiple   spaces  between",
    "trailing spaces  ",
    "line one\nline two\n\nparagraph\n",
    "\n\nstarts with blank lines",
    "\ttab\tseparated\tvalues",
    "digits 12345 and 3.14159",
    "emoji 😀🦜🤖 party 🎉",
    "中文测试 日本語 한국어",
    "accented: café, naïve, Ångström, São Paulo, Dvořák",
    "SELECT COUNT School/Club Team FROM 1-10015132-16 WHERE No. = '3'",
    "def f(x):\n    return x * 2\n",
    "fullwidth Ｆｕｌｌ",
    "literal <s> and </s> and [INST]",
]

# Mistral-7B-Instruct-v0.1's chat template since Mistral aligned it with mistral-common, as copies
# of its tokenizer_config.json on the hub carry it; reformatted, its role checks left out.
ALIGNED_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

CONVERSATIONS = {
    "one user turn": [("user", "What is the capital of France?")],
    "system prompt": [("system", "Answer in SQL."), ("user", "How many schools?")],
    "multi turn": [
        ("user", "Hi!"),
        ("assistant", "Hello! How can I help?"),
        ("user", "Count to 3."),
    ],
    "system, spaces, newlines, unicode": [
        ("system", "You are terse.\nNever apologise."),
        ("user", "  indented question?  "),
        ("assistant", "Réponse: 12345 😀🦜\n\n"),
        ("user", "\nSELECT COUNT School/Club Team FROM 1-10015132-16 WHERE No. = '3'"),
        ("assistant", "中文 answer"),
        ("user", "thanks\t"),
    ],
    "empty user message": [("user", "")],
    "two system messages": [("system", "Rule one."), ("system", "Rule two."), ("user", "Go.")],
}

ROLE_TO_MISTRAL = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(MISTRAL_V1)


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(MISTRAL_V1))


@pytest.fixture(scope="module")
def mistral_common_spm() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(MISTRAL_V1)


def _hf(factory: pytest.TempPathFactory, cls: type, legacy: bool):
    """A transformers tokenizer loaded like a hub model folder holding only tokenizer.model."""
    folder = factory.mktemp("hf_mistral")
    shutil.copy(MISTRAL_V1, folder / "tokenizer.model")
    # The settings of Mistral-7B-v0.1's tokenizer_config.json; legacy is the caller's choice.
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": legacy,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "chat_template": ALIGNED_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return cls.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf_spm(tmp_path_factory: pytest.TempPathFactory):
    return _hf(tmp_path_factory, TokenizersBackend, legacy=True)


@pytest.fixture(scope="module")
def hf_chat(tmp_path_factory: pytest.TempPathFactory):
    return _hf(tmp_path_factory, TokenizersBackend, legacy=False)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory: pytest.TempPathFactory):
    return _hf(tmp_path_factory, transformers.LlamaTokenizer, legacy=True)


@functools.cache
def _mistral_common(mode: ValidationMode) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(MISTRAL_V1), mode=mode)


def _mistral_chat(messages: list[tuple[str, str]], mode: ValidationMode) -> list[int]:
    mistral = _mistral_common(mode)
    request = ChatCompletionRequest(messages=[ROLE_TO_MISTRAL[r](content=c) for r, c in messages])
    return mistral.encode_chat_completion(request).tokens


def _chat(messages: list[tuple[str, str]]) -> list[ChatMessage]:
    return [ChatMessage(role, content) for role, content in messages]


# --- loading ---------------------------------------------------------------------------------


def test_loads_mistral_tokenizer_from_a_model_folder(tmp_path: Path) -> None:
    shutil.copy(MISTRAL_V1, tmp_path / "tokenizer.model")
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.path == tmp_path / "tokenizer.model"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)


def test_missing_tokenizer_says_what_to_copy(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="no tokenizer.model in .*copy the model's") as err:
        Tokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(err.value) and "tokenizer.json" in str(err.value)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_folder(tmp_path / "nope")


def test_corrupt_tokenizer_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(TokenizerError, match="is not a sentencepiece model") as err:
        Tokenizer.from_folder(tmp_path)
    assert str(bad) in str(err.value)


# --- encode / decode against the references ----------------------------------------------------


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_sentencepiece(tok: Tokenizer, sp, text: str) -> None:
    assert tok.encode(text) == [1, *sp.encode(text)]
    assert tok.encode(text, add_bos=False, add_eos=True) == [*sp.encode(text), 2]
    assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)) == text


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_mistral_common(tok: Tokenizer, mistral_common_spm, text: str) -> None:
    mistral = mistral_common_spm
    ids = mistral.encode(text, bos=True, eos=True)
    assert tok.encode(text, add_eos=True) == ids
    assert tok.decode(ids) == mistral.decode(ids)


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_transformers_sentencepiece_conversion(tok: Tokenizer, hf_spm, text) -> None:
    ids = tok.encode(text)
    assert hf_spm.encode(text, split_special_tokens=True) == ids
    assert hf_spm.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def test_transformers_llama_tokenizer_differs_only_on_spaces(tok: Tokenizer, hf_llama) -> None:
    # If this fails after a transformers upgrade, LlamaTokenizer changed: re-check the docstring.
    differing = {
        text
        for text in CORPUS
        if hf_llama.encode(text, split_special_tokens=True) != tok.encode(text)
    }
    assert differing == {
        " leading space",
        "   three leading spaces",
        "multiple   spaces  between",
        "def f(x):\n    return x * 2\n",
    }


def test_mistral_splits_digits_and_byte_falls_back_for_rare_emoji(tok: Tokenizer) -> None:
    digits = [tok.token_text(i) for i in tok.encode("12345", add_bos=False)]
    assert digits == [" ", "1", "2", "3", "4", "5"]
    parrot = tok.encode("🦜", add_bos=False)[1:]  # after the "▁" sentencepiece puts in front
    shown = [tok.token_text(i) for i in parrot]
    assert shown == ["bytes:\\xf0", "bytes:\\x9f", "bytes:\\xa6", "bytes:\\x9c"]
    assert tok.decode(parrot) == "🦜"


def test_text_cannot_produce_control_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("</s><s><unk>", add_bos=False)
    assert not {0, 1, 2} & set(ids)


SPECIAL_TEXTS = ["</s>", "<s>", "a</s>b", "x <s> y </s>  z<unk>", "<s><s>", "</s>\n[INST] next"]


# What vLLM's /tokenize does (lm-eval finds the EOS id by encoding "</s>"): transformers parses
# the special tokens' texts, and the text between them encodes as it would alone.
@pytest.mark.parametrize("text", SPECIAL_TEXTS + CORPUS)
def test_special_texts_read_as_ids_like_transformers(tok: Tokenizer, hf_spm, text: str) -> None:
    ids = tok.encode(text, add_bos=False, special_texts=True)
    assert ids == hf_spm.encode(text, add_special_tokens=False)
    if not any(special in text for special in ("<s>", "</s>", "<unk>")):
        assert ids == tok.encode(text, add_bos=False)  # what a completion prompt runs


def test_piece_is_the_sentencepiece_piece(tok: Tokenizer, sp) -> None:
    assert [tok.piece(i) for i in (0, 1, 2, 13)] == ["<unk>", "<s>", "</s>", "<0x0A>"]
    assert tok.piece(5820) == sp.id_to_piece(5820) == "▁SE"


def test_decode_skips_bos_and_eos(tok: Tokenizer) -> None:
    assert tok.decode([1, *tok.encode("Hi there", add_bos=False), 2]) == "Hi there"


def test_decode_of_a_foreign_id_names_the_mismatch(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="token id 32001 is outside the vocabulary"):
        tok.decode([1, 32001])
    with pytest.raises(TokenizerError, match="do not match"):
        tok.token_text(-1)


def test_token_text_for_logprobs(tok: Tokenizer, sp) -> None:
    assert tok.token_text(sp.piece_to_id("▁the")) == " the"
    assert tok.token_text(sp.piece_to_id("<0x0A>")) == "\n"
    assert tok.token_text(sp.piece_to_id("<0xE4>")) == "bytes:\\xe4"
    assert tok.token_text(sp.piece_to_id("中")) == "中"
    assert tok.token_text(tok.eos_id) == "</s>"


@pytest.mark.parametrize("text", [t for t in CORPUS if t])
def test_token_bytes_add_up_to_the_text(tok: Tokenizer, text: str) -> None:
    pieces = b"".join(tok.token_bytes(i) for i in tok.encode(text, add_bos=False))
    assert pieces == (" " + text).encode()  # sentencepiece's dummy-prefix space comes first


# --- streaming detokenizer --------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], prompt_ids: list[int] | None = None) -> list[str]:
    detok = tok.detokenizer(prompt_ids or [])
    chunks = [detok.add(i) for i in ids] + [detok.flush()]
    assert detok.text == "".join(chunks)
    assert detok.tokens == ids
    return chunks


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("text", CORPUS)
def test_streaming_adds_up_to_decode_without_broken_characters(tok, text, add_bos) -> None:
    ids = tok.encode(text, add_bos=add_bos)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_streaming_holds_a_byte_fallback_emoji_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode("Look: 🦜!", add_bos=False)
    chunks = _stream(tok, ids)
    assert "🦜" in chunks
    assert chunks.count("") >= 3  # the first three bytes of the parrot emit nothing


def test_streaming_keeps_spaces_between_tokens(tok: Tokenizer) -> None:
    chunks = _stream(tok, tok.encode("Hello big  world", add_bos=False))
    assert [c for c in chunks if c] == ["Hello", " big", " ", " world"]


def test_streaming_after_a_prompt_keeps_the_first_space(tok: Tokenizer, sp) -> None:
    ids = tok.encode("The capital of France is Paris.")
    split = ids.index(sp.piece_to_id("▁Paris"))
    chunks = _stream(tok, ids[split:], prompt_ids=ids[:split])
    assert "".join(chunks) == " Paris."
    assert "".join(_stream(tok, ids[split:])) == "Paris."  # a chat reply starts without it


def test_streaming_after_a_prompt_that_ends_in_byte_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("parrot 🦜 says hi")
    split = len(tok.encode("parrot 🦜"))
    assert ids[:split] == tok.encode("parrot 🦜")  # the prompt ends in the parrot's last byte
    assert "".join(_stream(tok, ids[split:], prompt_ids=ids[:split])) == " says hi"


def test_streaming_past_an_eos_keeps_the_space(tok: Tokenizer) -> None:
    ids = [*tok.encode("Hi", add_bos=False), tok.eos_id, *tok.encode("there", add_bos=False)]
    assert "".join(_stream(tok, ids)) == tok.decode(ids) == "Hi there"


def test_streaming_flush_returns_an_unfinished_character(tok: Tokenizer, sp) -> None:
    lead_byte = sp.piece_to_id("<0xE4>")
    detok = tok.detokenizer()
    assert detok.add(lead_byte) == ""
    assert detok.flush() == tok.decode([lead_byte]) == "\ufffd"


def test_streaming_decodes_a_short_window_per_token(tok: Tokenizer, monkeypatch) -> None:
    text = " ".join(CORPUS * 10)
    ids = tok.encode(text, add_bos=False)
    windows: list[int] = []
    decode = tok.decode

    def recording_decode(window):
        windows.append(len(window))
        return decode(window)

    monkeypatch.setattr(tok, "decode", recording_decode)
    assert "".join(_stream(tok, ids)) == text
    # The longest window: a held-back character right after a group of byte-fallback tokens.
    assert len(ids) > 1000 and max(windows) <= 8


# --- chat --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_matches_mistral_common_v1(tok: Tokenizer, name: str) -> None:
    messages = CONVERSATIONS[name]
    assert tok.encode_chat(_chat(messages)) == _mistral_chat(messages, ValidationMode.test)


# The jinja template knows a single system message; mistral-common (and encode_chat) join several.
@pytest.mark.parametrize("name", [n for n in CONVERSATIONS if n != "two system messages"])
def test_chat_matches_transformers_aligned_template(tok: Tokenizer, hf_chat, name: str) -> None:
    messages = [{"role": r, "content": c} for r, c in CONVERSATIONS[name]]
    text = hf_chat.apply_chat_template(messages, tokenize=False)
    assert tok.encode_chat(_chat(CONVERSATIONS[name])) == hf_chat.encode(
        text, add_special_tokens=False
    )


def _render_chat_template(messages: list[tuple[str, str]]) -> str:
    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment()  # as transformers renders templates
    env.globals["raise_exception"] = raise_exception
    return env.from_string(CHAT_TEMPLATE).render(
        messages=[{"role": r, "content": c} for r, c in messages], bos_token="<s>", eos_token="</s>"
    )


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_renders_what_encode_chat_encodes(tok: Tokenizer, hf_spm, name) -> None:
    text = _render_chat_template(CONVERSATIONS[name])
    ids = tok.encode_chat(_chat(CONVERSATIONS[name]))
    assert tok.encode(text, add_bos=False, special_texts=True) == ids
    assert hf_spm.encode(text, add_special_tokens=False) == ids


def test_chat_template_refuses_roles_out_of_order() -> None:
    with pytest.raises(ValueError, match="alternate"):
        _render_chat_template([("user", "a"), ("user", "b")])


def test_chat_reads_as_the_v1_format(tok: Tokenizer) -> None:
    messages = CONVERSATIONS["multi turn"] + [("assistant", "1, 2, 3.")]
    ids = tok.encode_chat(_chat(messages), add_generation_prompt=False)
    # Control ids decode to nothing; each segment's "▁" shows as the space before "[INST]".
    assert tok.decode(ids) == (
        "[INST] Hi! [/INST] Hello! How can I help? [INST] Count to 3. [/INST] 1, 2, 3."
    )
    first_answer_end = len(tok.encode("[INST] Hi! [/INST]")) + len(
        tok.encode("Hello! How can I help?", add_bos=False)
    )
    assert [i for i, t in enumerate(ids) if t in (1, 2)] == [0, first_answer_end, len(ids) - 1]


def test_finished_chat_for_training_matches_mistral_common(tok: Tokenizer) -> None:
    messages = CONVERSATIONS["system, spaces, newlines, unicode"] + [("assistant", "De rien.")]
    ids = tok.encode_chat(_chat(messages), add_generation_prompt=False)
    assert ids == _mistral_chat(messages, ValidationMode.finetuning)
    prompt = tok.encode_chat(_chat(messages[:-1]))
    assert ids[: len(prompt)] == prompt  # so a data loader can mask the prompt
    assert ids[len(prompt) :] == tok.encode("De rien.", add_bos=False, add_eos=True)


def test_empty_system_message_is_ignored_like_mistral_common(tok: Tokenizer) -> None:
    with_empty = _chat([("system", ""), ("user", "Hi")])
    assert tok.encode_chat(with_empty) == tok.encode_chat(_chat([("user", "Hi")]))


@pytest.mark.parametrize(
    ("messages", "add_generation_prompt", "match"),
    [
        ([], True, "no user message"),
        ([("system", "Be nice.")], True, "no user message"),
        ([("assistant", "Hi"), ("user", "Hello")], True, r"messages\[0\] is 'assistant'"),
        ([("user", "a"), ("user", "b")], True, r"messages\[1\] is 'user'.*alternate"),
        ([("user", "a"), ("system", "b")], True, r"messages\[1\] is a system message"),
        ([("user", "a"), ("tool", "b")], True, r"role 'tool'"),
        ([("user", "a"), ("assistant", "")], False, "empty assistant message"),
        ([("user", "a"), ("assistant", "b")], True, "add_generation_prompt=False"),
    ],
)
def test_chat_rejects_malformed_conversations(tok, messages, add_generation_prompt, match) -> None:
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(_chat(messages), add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("seed", range(6))
def test_streaming_table_path_matches_the_window_path(tok: Tokenizer, sp, seed: int, monkeypatch):
    """Random ids of every kind (plain pieces, "▁", byte fallback that does and does not make a
    character, control ids, unknown) after random prompts: the per-token table lookup must emit
    exactly what decoding the window emits."""
    rng = random.Random(seed)
    table = tok.appended_texts()
    plain = [i for i in range(tok.vocab_size) if table[i] is not None]
    parrot = tok.encode("🦜", add_bos=False)[-4:]
    kinds = [
        lambda: [rng.choice(plain)],
        lambda: [sp.piece_to_id("▁")],
        lambda: [sp.piece_to_id(f"<0x{rng.randrange(256):02X}>")],
        lambda: list(parrot),
        lambda: [rng.choice([tok.bos_id, tok.eos_id, tok.unk_id])],
    ]
    weights = [70, 6, 8, 8, 8]
    for _ in range(20):
        ids = [i for _ in range(60) for i in rng.choices(kinds, weights)[0]()]
        prompt = [i for _ in range(rng.randrange(3)) for i in rng.choices(kinds, weights)[0]()]
        fast = _stream(tok, ids, prompt)
        with monkeypatch.context() as m:
            m.setattr(tok, "appended_texts", lambda: ())
            assert _stream(tok, ids, prompt) == fast


def test_streaming_looks_up_most_tokens_without_decoding(tok: Tokenizer, monkeypatch) -> None:
    text = "Select the name of every player whose team won more than 3 games in 2019, sorted. " * 20
    ids = tok.encode(text, add_bos=False)
    calls = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda window: calls.append(1) or decode(window))
    _stream(tok, ids)
    assert len(calls) < len(ids) / 10  # the window path only around byte-fallback characters
