"""vLLM's tokenizer endpoints over the served model's tokenizer: /tokenize, /detokenize and
/tokenizer_info, as lm-evaluation-harness's remote tokenizer (and vLLM clients) call them.

/tokenize gives the ids /v1/completions runs for the same text (BOS first with
add_special_tokens, the default), so a client counting tokens with it lines its counts up with
the echoed logprobs; the one difference is that here "<s>", "</s>" and "<unk>" in the text read
as their ids (lm-eval finds the EOS id by tokenizing "</s>"), where a completion prompt keeps them
as literal text.
"""

from __future__ import annotations

from mlx_core.tokenizer import CHAT_TEMPLATE, Tokenizer
from server.adapters import AdapterRegistry
from server.engine_client import EngineClient
from server.errors import BadRequestError
from server.openai_serving import chat_messages
from server.schemas.tokenizer import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)


async def tokenize(
    req: TokenizeRequest, engine: EngineClient, registry: AdapterRegistry
) -> TokenizeResponse:
    """The ids of `prompt`, or of `messages` formatted as /v1/chat/completions formats them."""
    model = engine.require_ready()
    if req.model is not None:  # every adapter shares the base model's tokenizer
        await registry.resolve(req.model, model.id)
    tok = engine.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise BadRequestError(
            "send either `prompt` (text) or `messages` (a chat) to tokenize", param="prompt"
        )
    if req.prompt is not None:
        add_bos = True if req.add_special_tokens is None else req.add_special_tokens
        ids = tok.encode(req.prompt, add_bos=add_bos, special_texts=True)
    else:
        ids = _chat_ids(req, tok)
    strs = [tok.piece(t) for t in ids] if req.return_token_strs else None
    return TokenizeResponse(len(ids), model.max_model_len, ids, strs)


def _chat_ids(req: TokenizeRequest, tok: Tokenizer) -> list[int]:
    assert req.messages is not None
    if req.continue_final_message and req.add_generation_prompt:
        raise BadRequestError(
            "continue_final_message continues the last (assistant) message, add_generation_prompt "
            "starts a new one: set add_generation_prompt to false",
            param="continue_final_message",
        )
    if not req.messages:
        raise BadRequestError("messages is empty: send at least one user message", param="messages")
    messages = chat_messages(req.messages)
    if req.continue_final_message and messages[-1].role != "assistant":
        raise BadRequestError(
            "continue_final_message needs the last message to be the assistant's: add the "
            "start of the answer as an assistant message",
            param="continue_final_message",
        )
    try:
        ids = tok.encode_chat(messages, add_generation_prompt=req.add_generation_prompt)
    except ValueError as e:
        raise BadRequestError(str(e), param="messages") from e
    if req.continue_final_message:
        ids = ids[:-1]  # the answer goes on: no EOS after it
    if req.add_special_tokens:  # vLLM's meaning: a BOS on top of the template's own
        ids = [tok.bos_id, *ids]
    return ids


async def detokenize(
    req: DetokenizeRequest, engine: EngineClient, registry: AdapterRegistry
) -> DetokenizeResponse:
    """The text of `tokens` (BOS and EOS read as nothing, as in completions' text)."""
    model = engine.require_ready()
    if req.model is not None:
        await registry.resolve(req.model, model.id)
    # Checked here, not by catching the decoder's error: sentencepiece raises a bare TypeError
    # for ids beyond 64 bits, which would be a 500.
    vocab = engine.tokenizer.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise BadRequestError(
            f"token id {bad} is outside the vocabulary (0..{vocab - 1}): send ids that "
            "/tokenize returned",
            param="tokens",
        )
    return DetokenizeResponse(engine.tokenizer.decode(req.tokens))


def tokenizer_info(engine: EngineClient) -> TokenizerInfo:
    """The tokenizer's settings as a Hugging Face tokenizer_config.json has them (vLLM's shape)."""
    model = engine.require_ready()
    tok = engine.tokenizer
    return TokenizerInfo(
        # Mistral's tokenizer_config.json names it; sentencepiece itself does the work here.
        tokenizer_class="LlamaTokenizer",
        bos_token=tok.piece(tok.bos_id),
        eos_token=tok.piece(tok.eos_id),
        unk_token=tok.piece(tok.unk_id),
        pad_token=None,  # Mistral defines none; prompts are never padded on the wire
        add_bos_token=True,
        add_eos_token=False,
        legacy=True,
        clean_up_tokenization_spaces=False,
        model_max_length=model.max_model_len,
        vocab_size=tok.vocab_size,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        chat_template=CHAT_TEMPLATE,
    )
