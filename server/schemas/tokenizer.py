"""vLLM's tokenizer endpoints (/tokenize, /detokenize, /tokenizer_info): request and response shapes.

The shapes are vLLM's, field for field, so clients written for it (lm-evaluation-harness's
`tokenizer_backend=remote`) work unchanged.
"""

from __future__ import annotations

from msgspec import Struct

from server.schemas.chat import ChatMessage
from server.schemas.common import RequestBody


class TokenizeRequest(RequestBody):
    """Either `prompt` (text) or `messages` (a chat, formatted as /v1/chat/completions does).

    vLLM's two request kinds in one Struct: msgspec tells union members apart only by a tag field,
    which vLLM's bodies do not have.
    """

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # None: vLLM's defaults, BOS added for `prompt`, not for `messages` (the template has it).
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool | None = False


class TokenizeResponse(Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    tokens: list[int]
    model: str | None = None


class DetokenizeResponse(Struct):
    prompt: str


class TokenizerInfo(Struct):
    """What vLLM serves: the model's tokenizer_config.json as Hugging Face would load it, with
    the chat template that gives /v1/chat/completions' ids."""

    tokenizer_class: str
    bos_token: str
    eos_token: str
    unk_token: str
    pad_token: str | None
    add_bos_token: bool
    add_eos_token: bool
    # Texts between special tokens each start with sentencepiece's "▁" (Hugging Face's legacy=True).
    legacy: bool
    clean_up_tokenization_spaces: bool
    model_max_length: int
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    chat_template: str
