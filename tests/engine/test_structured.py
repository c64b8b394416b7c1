"""Structured outputs: every constrained generation from a noise model parses, by construction.

The "model" here is random logits (and once the tiny random Mistral): its unconstrained output is
junk, so only a working mask makes these pass. Generation runs the way the engine will run it:
one batch, a mask per step for the constrained rows, sampling at temperature 0.8, an advance per
sampled token, rows ending at EOS or when their matcher stops.
"""

from __future__ import annotations

import json
import re

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

from mlx_core.structured import (
    Constraint,
    ConstraintError,
    HealingMatcher,
    PrefixStripper,
    RowMatcher,
    apply_masks,
    compile_grammar,
    heal_prompt,
    lark_grammar,
    vocabulary,
    with_prefix,
)

_POOL = 64  # rows of precomputed noise: drawing 2 x B x 32000 fresh numbers per step is slow


def generate(rows, vocab, masks, *, seed, max_tokens, bias=None, extra_columns=0):
    """Sample a batch of rows to the end at temperature 0.8; returns [(bytes, finish)] per row.

    The noise model: i.i.d. normal logits (scale 3), taken from a pool by random row and
    rotation each step, plus Gumbel noise for the sampling, taken the same way.
    """
    rng = np.random.default_rng(seed)
    rows = list(rows)
    B, V = len(rows), vocab.size + extra_columns
    normal = rng.standard_normal((_POOL, V), dtype=np.float32) * 3.0
    gumbel = rng.gumbel(size=(_POOL, V)).astype(np.float32)
    if bias is not None:
        normal[:, : vocab.size] += bias

    def draw(pool):
        picked = pool[rng.integers(_POOL, size=B)]
        if bias is None:  # rotate the columns too (a bias must stay on its tokens)
            picked = np.roll(picked, int(rng.integers(V)), axis=1)
        return mx.array(picked)

    out = [[] for _ in rows]
    finish = [None] * B
    for _ in range(max_tokens):
        live = [c if finish[i] is None else None for i, c in enumerate(rows)]
        future = masks.submit(live)  # on the worker thread, as while the device runs a forward
        logits = draw(normal)
        masked = apply_masks(logits, future.result().masks)
        tokens = mx.argmax(masked / 0.8 + draw(gumbel), axis=-1).tolist()
        for i, tok in enumerate(tokens):
            if finish[i] is not None:
                continue
            if tok == vocab.eos_id:
                finish[i] = "stop"
                continue
            assert rows[i] is None or rows[i].advance(tok), f"row {i}: token {tok} was masked"
            out[i].append(tok)
            if rows[i] is not None and rows[i].is_stopped():
                finish[i] = "stop"
        if all(f is not None for f in finish):
            break
    finish = [f or "length" for f in finish]
    return [(b"".join(vocab.token_bytes[t] for t in ids), f) for ids, f in zip(out, finish)]


def run(constraint, vocab, masks, n=32, max_tokens=160, seed=0, **kw):
    grammar = compile_grammar(constraint)
    rows = [RowMatcher(grammar, vocab, constraint.kind) for _ in range(n)]
    return generate(rows, vocab, masks, seed=seed, max_tokens=max_tokens, **kw)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "zip": {"type": "string", "pattern": r"^\d{5}$"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "zip"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [1, 2])
def test_json_schema_outputs_validate(vocab, masks, seed):
    results = run(Constraint("json", PERSON), vocab, masks, seed=seed)
    assert all(f == "stop" for _, f in results)
    for text, _ in results:
        value = json.loads(text.decode())
        jsonschema.validate(value, PERSON)
        assert value["zip"].isascii()  # \d means [0-9], not any Unicode digit


def test_json_schema_given_as_text_is_the_same_constraint(vocab):
    as_text = Constraint("json", json.dumps(PERSON, indent=2))
    assert compile_grammar(as_text) == compile_grammar(Constraint("json", PERSON))


def test_json_object_outputs_are_objects(vocab, masks):
    # Any object is unbounded, so the noise model leans towards closing characters and EOS.
    bias = np.zeros(vocab.size, dtype=np.float32)
    closing = [i for i, b in enumerate(vocab.token_bytes) if set(b) & set(b'"}]')]
    bias[closing] = 6.0
    bias[vocab.eos_id] = 6.0
    results = run(Constraint("json_object"), vocab, masks, seed=3, bias=bias)
    finished = [t for t, f in results if f == "stop"]
    assert len(finished) >= 24
    for text in finished:
        assert isinstance(json.loads(text.decode()), dict)


def test_regex_outputs_fullmatch(vocab, masks):
    pattern = r"[A-Z]{2}-\d{3}( [a-z]{1,6})?"
    results = run(Constraint("regex", pattern), vocab, masks, seed=4, max_tokens=40)
    assert all(f == "stop" for _, f in results)
    for text, _ in results:
        assert re.fullmatch(pattern, text.decode(), flags=re.ASCII), text


def test_regex_digit_is_ascii(vocab):
    row = RowMatcher(compile_grammar(Constraint("regex", r"\d")), vocab)
    allowed = {vocab.token_bytes[i] for i in np.nonzero(row.allowed_mask())[0]}
    assert allowed == {str(d).encode() for d in range(10)}  # no lead byte of "٣" (0xD9)


def test_choice_outputs_are_choices(vocab, masks):
    choices = ["yes", "yes please", 'say "no"', "back\\slash", "café", "two\nlines"]
    results = run(Constraint("choice", choices), vocab, masks, seed=5, max_tokens=20)
    assert all(f == "stop" for _, f in results)
    seen = {text.decode() for text, _ in results}
    assert seen <= set(choices)
    assert len(seen) >= 3  # the noise picks different choices, not one path


def test_lark_grammar_outputs_parse(vocab, masks):
    grammar = r"""
start: "SELECT " cols " FROM " table (" WHERE " col " = " NUMBER)?
cols: col ("," col)~0..2
col: "name" | "age" | "city"
table: "people" | "cities"
NUMBER: /[0-9]{1,3}/
"""
    sql = re.compile(
        r"SELECT (name|age|city)(,(name|age|city)){0,2} FROM (people|cities)"
        r"( WHERE (name|age|city) = [0-9]{1,3})?"
    )
    results = run(Constraint("grammar", grammar), vocab, masks, seed=6, max_tokens=60)
    assert all(f == "stop" for _, f in results)
    for text, _ in results:
        assert sql.fullmatch(text.decode()), text


def test_lark_grammar_is_cached_and_shared_with_grammar_kind():
    text = 'start: "a" | "b"\n'
    assert lark_grammar(text) is lark_grammar(text)
    assert compile_grammar(Constraint("grammar", text)) == lark_grammar(text)


def test_after_from_the_next_space_is_one_token(vocab, tokenizer):
    """Mistral writes " 2" as "▁" + "2": after " FROM" the single-space token must be allowed
    (a tokenizer built with the dummy prefix allows only the two-space one)."""
    row = RowMatcher(lark_grammar('start: "SELECT a FROM t WHERE x = " /[0-9]+/\n'), vocab)
    text = "SELECT a FROM t WHERE x ="
    ids = vocab.ll_tokenizer.tokenize_str(text)
    assert b"".join(vocab.token_bytes[i] for i in ids) == text.encode()
    assert (
        tokenizer.encode("FROM", add_bos=False) == [10657] and 10657 in ids
    )  # " FROM" is one token
    assert all(row.advance(i) for i in ids)
    allowed = row.allowed_mask()
    space, two_spaces = 28705, 259  # "▁", "▁▁"
    assert allowed[space] and not allowed[two_spaces]
    assert row.advance(space) and row.advance(vocab.ids_of_bytes[b"2"][0])
    assert row.is_accepting()


def test_vocabulary_bytes(vocab, tokenizer):
    assert vocab.size == tokenizer.vocab_size
    assert vocabulary(tokenizer) is vocab  # built once per tokenizer
    assert vocab.eos_id == tokenizer.eos_id
    assert {tokenizer.bos_id, tokenizer.eos_id} <= vocab.special_ids
    assert vocab.token_bytes[tokenizer.eos_id] == b""
    assert vocab.token_bytes[tokenizer.encode("\n", add_bos=False)[-1]] == b"\n"
    ids = tokenizer.encode("Hello wörld 🤗 x", add_bos=False)
    assert b"".join(vocab.token_bytes[i] for i in ids) == " Hello wörld 🤗 x".encode()


def test_complete_grammar_allows_eos_and_stopped_matcher_only_eos(vocab):
    row = RowMatcher(compile_grammar(Constraint("choice", ["yes", "yes please"])), vocab)
    for i in vocab.ll_tokenizer.tokenize_str("yes"):
        assert row.advance(i)
    allowed = row.allowed_mask()
    assert row.is_accepting() and not row.is_stopped()
    assert allowed[vocab.eos_id] and allowed.sum() > 1  # " please" may still follow
    for i in vocab.ll_tokenizer.tokenize_str(" please"):
        assert row.advance(i)
    assert row.is_stopped()
    assert np.nonzero(row.allowed_mask())[0].tolist() == [vocab.eos_id]


def test_rejected_token_reports_false(vocab):
    row = RowMatcher(compile_grammar(Constraint("choice", ["yes"])), vocab)
    assert not row.advance(vocab.ids_of_bytes[b"no"][0])
    assert row.is_error() and row.is_stopped() and row.error


def test_short_max_tokens_ends_unfinished(vocab, masks):
    results = run(Constraint("json", PERSON), vocab, masks, n=4, max_tokens=3, seed=7)
    for text, finish in results:
        assert finish == "length"
        with pytest.raises(ValueError):
            json.loads(text.decode(errors="replace"))


def test_masks_leave_unconstrained_rows_and_mask_padding(vocab, masks):
    row = RowMatcher(compile_grammar(Constraint("choice", ["a", "b"])), vocab)
    V = vocab.size + 128  # a model whose head is padded past the tokenizer
    logits = np.random.default_rng(0).standard_normal((3, V)).astype(np.float32)
    result = masks.compute([None, row, None])
    out = np.array(apply_masks(mx.array(logits), result))
    np.testing.assert_array_equal(out[[0, 2]], logits[[0, 2]])
    allowed = np.nonzero(np.isfinite(out[1]))[0]
    assert {vocab.token_bytes[i] for i in allowed} == {b"a", b"b"}
    assert masks.compute([None, None]) is None  # nothing constrained: logits untouched


def test_optional_leading_space_for_chat(vocab):
    grammar = with_prefix(compile_grammar(Constraint("json", {"type": "integer"})), " ", True)
    for text in [" 42", "42"]:
        row = RowMatcher(grammar, vocab)
        assert all(row.advance(i) for i in vocab.ll_tokenizer.tokenize_str(text)), text
        assert row.is_accepting()
    row = RowMatcher(grammar, vocab)
    assert not all(row.advance(i) for i in vocab.ll_tokenizer.tokenize_str("  42"))


def test_required_prefix_for_healing_with_a_constraint(vocab):
    grammar = with_prefix(compile_grammar(Constraint("choice", ["Paris", "Lyon"])), " ")
    row = RowMatcher(grammar, vocab)
    assert all(row.advance(i) for i in vocab.ll_tokenizer.tokenize_str(" Paris"))
    assert row.is_stopped()
    row = RowMatcher(grammar, vocab)
    assert not all(row.advance(i) for i in vocab.ll_tokenizer.tokenize_str("Paris"))


BAD = [
    ("json", "{not json", "not valid JSON"),
    ("json", "[1, 2]", "must be an object"),
    ("json", {"type": "objec"}, "objec"),
    ("json", {"type": "array", "uniqueItems": True}, "uniqueItems"),
    ("regex", "a(", "unclosed group"),
    ("regex", "(?=a)b", "look-around"),
    ("regex", "", "non-empty"),
    ("choice", [], "non-empty list"),
    ("choice", ["a", 1], "list of strings"),
    ("choice", "a", "list of strings"),
    ("grammar", "start: foo", "unknown name"),
    ("grammar", "start: (", "grammar cannot be used"),
    ("xml", "<a/>", "unknown constraint kind"),
]


@pytest.mark.parametrize("kind,value,needle", BAD, ids=[f"{k}-{n}" for k, _, n in BAD])
def test_bad_specs_raise_constraint_error(kind, value, needle):
    with pytest.raises(ConstraintError) as info:
        compile_grammar(Constraint(kind, value))
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError) and info.value.kind == kind


def test_healing_backs_off_the_trailing_space(tokenizer, vocab, masks):
    prompt = tokenizer.encode("Q: What is the capital of France?\nA: ")
    healing = heal_prompt(prompt, vocab)
    assert healing.prompt == tokenizer.encode("Q: What is the capital of France?\nA:")
    assert (healing.prefix, healing.backed_off) == (b" ", 1)
    results = generate(
        [HealingMatcher(healing.prefix, vocab) for _ in range(32)],
        vocab,
        masks,
        seed=8,
        max_tokens=3,
    )
    for text, _ in results:
        assert text.startswith(b" ")
    stripper = PrefixStripper(healing.text)
    assert stripper.feed("") + stripper.feed(" Paris") + stripper.feed(" is") == "Paris is"


def test_healing_spells_a_long_prefix_over_several_tokens(vocab):
    healer = HealingMatcher(b" wor", vocab)
    allowed = healer.allowed_mask()
    assert allowed[vocab.ids_of_bytes[b" world"][0]] and allowed[vocab.ids_of_bytes[b" w"][0]]
    assert not allowed[vocab.ids_of_bytes[b" x"][0]] and not allowed[vocab.eos_id]
    assert healer.advance(vocab.ids_of_bytes[b" w"][0]) and healer.remaining == b"or"
    assert not healer.advance(vocab.ids_of_bytes[b"x"][0])
    assert healer.advance(vocab.ids_of_bytes[b"ord"][0]) and not healer.active


def test_healing_leaves_prompts_that_need_none(tokenizer, vocab):
    for text in ["", "x"]:  # only BOS, or BOS and one token: the BOS side is never backed off
        prompt = tokenizer.encode(text)
        assert heal_prompt(prompt, vocab).prompt == prompt[: len(prompt)]
    prompt = tokenizer.encode("Hello", add_eos=True)  # ends in EOS: not text
    assert heal_prompt(prompt, vocab).backed_off == 0


def test_tiny_model_constrained_by_its_own_logits(tiny_model, vocab, masks):
    """The real forward pass (vocab-sized head) feeding the mask, in a batch of 4 with one
    unconstrained row: constrained rows give the choice, the free row gives noise."""
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    grammar = compile_grammar(Constraint("choice", ["red", "green", "blue"]))
    rows = [
        RowMatcher(grammar, vocab),
        None,
        RowMatcher(grammar, vocab),
        RowMatcher(grammar, vocab),
    ]
    prompt = tokenizer.encode("Colour:")
    tokens = mx.array([prompt] * 4)
    cache = model.new_cache(4, [0] * 4)
    out: list[list[int]] = [[] for _ in rows]
    key = mx.random.key(0)
    for _ in range(6):
        logits = model(tokens, cache=cache)[:, -1, :]
        key, sub = mx.random.split(key)
        masked = apply_masks(logits, masks.compute(rows))
        nxt = mx.argmax(masked / 0.8 + mx.random.gumbel(masked.shape, key=sub), axis=-1)
        for i, tok in enumerate(nxt.tolist()):
            if rows[i] is not None and (rows[i].is_stopped() or tok == vocab.eos_id):
                continue
            out[i].append(tok)
            if rows[i] is not None:
                assert rows[i].advance(tok)
        tokens = nxt[:, None]
    for i in (0, 2, 3):
        assert tokenizer.decode(out[i]) in {"red", "green", "blue"}
