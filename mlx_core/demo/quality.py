"""How well a model writes SQL: greedy generation through the Engine, judged by execution.

The demo build reports these numbers into build.json and the test of the shipped model checks
them; both generate the way the service does (the continuous-batching Engine, greedy, no stop
sequences), so "stops by itself" means the model chose EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlx_core.demo.schema_corpus import to_chat
from mlx_core.engine import Engine, GenerationRequest
from mlx_core.eval.sql_scoring import execution_match
from mlx_core.eval.wikisql import exact_match, parse_example, prompt_of
from mlx_core.model import Mistral
from mlx_core.sampling import SamplingParams
from mlx_core.tokenizer import ChatMessage, Tokenizer

# The longest corpus answer is ~65 tokens; WikiSQL's are a little longer.
MAX_SQL_TOKENS = 128


@dataclass(frozen=True)
class Completion:
    text: str  # the generated SQL, stripped
    stopped: bool  # ended with EOS (not by running out of max_tokens)


@dataclass(frozen=True)
class SqlQuality:
    n: int
    execution: float  # fraction whose SQL returns the gold answer's rows
    exact: float  # fraction equal to the gold SQL after normalization
    stop_rate: float  # fraction that ended with EOS by themselves

    def line(self) -> str:
        return (
            f"execution {self.execution:.1%}  exact {self.exact:.1%}  "
            f"stop {self.stop_rate:.1%}  (n={self.n})"
        )


def complete(
    model: Mistral,
    tokenizer: Tokenizer,
    prompts: Sequence[str | list[int]],
    max_tokens: int = MAX_SQL_TOKENS,
    batch_size: int = 64,
) -> list[Completion]:
    """Greedy completions of `prompts` (texts, or token ids such as a rendered chat), generated
    in one running batch of up to `batch_size`."""
    engine = Engine(model, tokenizer, max_num_seqs=batch_size, prefix_cache_tokens=0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        engine.add_request(GenerationRequest(str(i), ids, params))
    texts: list[list[str]] = [[] for _ in prompts]
    finish: list[str | None] = [None] * len(prompts)
    while engine.has_work():
        for out in engine.step():
            i = int(out.request_id)
            texts[i].append(out.text)
            if out.finish_reason:
                finish[i] = out.finish_reason
    return [Completion("".join(t).strip(), f == "stop") for t, f in zip(texts, finish)]


def chat_prompt(tokenizer: Tokenizer, example: str) -> list[int]:
    """A WikiSQL-format example's question as /v1/chat/completions renders it: one user turn
    (table, columns and question, as `schema_corpus.to_chat` writes it)."""
    user = to_chat(example)["messages"][0]["content"]
    return tokenizer.encode_chat([ChatMessage("user", user)])


def sql_quality(
    model: Mistral,
    tokenizer: Tokenizer,
    examples: Sequence[str],
    batch_size: int = 64,
    chat: bool = False,
    prompt_suffix: str = "",
) -> SqlQuality:
    """Execution/exact accuracy and stop rate of greedy SQL for WikiSQL-format examples,
    prompted as text ("...\nA:" + `prompt_suffix`, say " ") or, with `chat`, through the chat
    template."""
    if not examples:
        raise ValueError("no examples to evaluate: pass WikiSQL-format texts with their answers")
    prompts = [
        chat_prompt(tokenizer, e) if chat else prompt_of(e) + prompt_suffix for e in examples
    ]
    completions = complete(model, tokenizer, prompts, batch_size=batch_size)
    executed = exact = 0
    for text, done in zip(examples, completions, strict=True):
        example = parse_example(text)
        assert example.answer is not None, f"example without a gold answer: {text[:80]!r}"
        executed += execution_match(example, done.text, example.answer)
        exact += exact_match(done.text, example.answer)
    n = len(examples)
    stopped = sum(c.stopped for c in completions)
    return SqlQuality(n, executed / n, exact / n, stopped / n)
