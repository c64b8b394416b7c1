"""The demo build's training examples: three prompt shapes, the loss on what the model writes."""

from __future__ import annotations

import pytest

from mlx_core.demo.schema_corpus import generate_examples
from mlx_core.demo.training_set import training_examples
from mlx_core.tokenizer import ChatMessage, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_path)


def targets(tokenizer: Tokenizer, tokens: tuple[int, ...], mask: tuple[bool, ...]) -> str:
    return tokenizer.decode([t for t, m in zip(tokens, mask, strict=True) if m])


def test_each_shape_learns_the_sql_and_its_eos(tokenizer: Tokenizer) -> None:
    [text] = generate_examples(1, seed=7)
    prompt, _, sql = text.rpartition("\nA: ")
    shapes = {  # chat share, "A: " share
        "plain": (0.0, 0.0),
        "space": (0.0, 1.0),
        "chat": (1.0, 0.0),
    }
    for name, (chat, space) in shapes.items():
        [e] = training_examples([text], tokenizer, 384, chat, space, seed=0)
        assert e.tokens[-1] == tokenizer.eos_id and e.loss_mask[-1], name
        assert targets(tokenizer, e.tokens, e.loss_mask).strip() == sql, name
        n_answer = sum(e.loss_mask)
        prompt_ids = e.tokens[: len(e.tokens) - n_answer]
        if name == "space":  # the prompt a client typing "A: " sends, its lone space and all
            assert list(prompt_ids) == tokenizer.encode(prompt + "\nA: ")
        if name == "chat":
            user = [ChatMessage("user", prompt)]
            assert list(prompt_ids) == tokenizer.encode_chat(user)


def test_question_loss_adds_the_question_to_plain_examples_only(tokenizer: Tokenizer) -> None:
    [text] = generate_examples(1, seed=7)
    question = text.split("\nQ: ")[1].split("\nA: ")[0]
    [plain] = training_examples([text], tokenizer, 384, 0.0, 0.0, seed=0, question_loss=True)
    learned = targets(tokenizer, plain.tokens, plain.loss_mask)
    assert learned.strip().startswith(question) and learned.endswith(text.rpartition("A: ")[2])
    [spaced] = training_examples([text], tokenizer, 384, 0.0, 1.0, seed=0, question_loss=True)
    assert question not in targets(tokenizer, spaced.tokens, spaced.loss_mask)
