"""The demo build's training examples as token ids, in the three prompt shapes clients send.

A text prompt ending "A:" (the WikiSQL seed format), one ending "A: " (a lone-space piece, as
many clients type it), and a chat (the Mistral template, for /v1/chat/completions). The loss is
on the SQL answer and its EOS only: predicting random table ids and values in the prompt teaches
nothing, and the answer is what the model is for (the question may be learned too).
"""

from __future__ import annotations

import random

from mlx_core.data.batches import TokenizedExample, tokenize_examples
from mlx_core.data.formats import Example, PromptCompletionExample, parse_example
from mlx_core.demo.schema_corpus import to_chat
from mlx_core.tokenizer import Tokenizer


def training_examples(
    texts: list[str],
    tokenizer: Tokenizer,
    max_seq_len: int,
    chat_fraction: float,
    space_fraction: float,
    seed: int,
    question_loss: bool = False,
) -> list[TokenizedExample]:
    """`texts` tokenized, a `chat_fraction` share as chats and a `space_fraction` share with
    the prompt ending "A: " (chosen by `seed`), the rest ending "A:".

    With `question_loss`, the "A:" examples learn their question as well as the answer: a
    question names its columns as the header spells them, so predicting it is copying practice
    from the first steps on (the answer alone gives a fresh model few tokens to learn that from).
    """
    chooser = random.Random(f"prompt-shapes:{seed}")
    examples: list[Example] = []
    spaced: list[TokenizedExample] = []
    for text in texts:
        prompt, _, sql = text.rpartition("\nA: ")
        pick = chooser.random()
        if pick < chat_fraction:
            examples.append(parse_example(to_chat(text), "demo corpus"))
        elif pick < chat_fraction + space_fraction:
            # A prompt ending "A: " ends in a lone-space piece; the answer's tokens follow it as
            # they would alone (" SELECT"), which is what the model sees when a client sends it.
            ids = tokenizer.encode(prompt + "\nA: ", add_bos=True)
            answer = tokenizer.encode(sql, add_bos=False) + [tokenizer.eos_id]
            if len(ids) + len(answer) > max_seq_len:
                raise ValueError(f"an example of {len(ids) + len(answer)} tokens: {text[:80]!r}")
            mask = (False,) * len(ids) + (True,) * len(answer)
            spaced.append(TokenizedExample(tuple(ids + answer), mask))
        elif question_loss:
            header, _, asked = prompt.partition("\nQ:")
            examples.append(PromptCompletionExample(header + "\nQ:", f"{asked}\nA: {sql}"))
        else:
            examples.append(PromptCompletionExample(prompt + "\nA:", " " + sql))
    tokenized, report = tokenize_examples(examples, tokenizer, max_seq_len, mask_prompt=True)
    if report.n_dropped:
        raise ValueError(report.warning())
    return tokenized + spaced
