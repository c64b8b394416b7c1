"""The embedded demo model: it ships, loads like any model folder, and reads the schema it is given.

Prompts come from the schema corpus with seeds the build never used, so every table is new to the
model; the held-out parts are the build's own (words, question phrasings and French questions it
never trained on). Generation goes through the Engine (greedy, no stop sequences) as the service
runs it. The thresholds sit below the build's measured figures (build.json) by what a sample of
this size can wander, and above what a model that copies no column could reach.
"""

from __future__ import annotations

import json

import pytest

import mlx_core.demo as demo
from mlx_core.demo import ASSET_FILES, DemoModelMissingError, default_model_path
from mlx_core.demo.quality import complete, sql_quality
from mlx_core.demo.schema_corpus import generate_examples
from mlx_core.weights import load_model

MAX_ASSET_BYTES = 32 * 2**20  # the build's budget (mlx_core/demo/build.py)
FRESH_SEED = 20_240_601  # not a seed the build draws its corpus or held-out sets from
HELD_OUT_PARTS = ["vocabulary", "phrasing", "french"]
# The README's quickstart question: a table of held-out words only (a `vocabulary` example).
README_PROMPT = (
    "table: table_992\ncolumns: Opened, Points Against (km²), Destination, Founder\n"
    "Q: Give me the destination with the Opened was November 18, 1926 with Founder equals Chile\n"
    "A:"
)


@pytest.fixture(scope="module")
def build_record() -> dict:
    return json.loads((default_model_path() / "build.json").read_text())


@pytest.fixture(scope="module")
def demo_model():
    return load_model(default_model_path())


def test_assets_ship_inside_the_package_and_are_small() -> None:
    folder = default_model_path()
    sizes = {name: (folder / name).stat().st_size for name in ASSET_FILES}
    assert sum(sizes.values()) < MAX_ASSET_BYTES, sizes


def test_missing_assets_say_how_to_get_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(demo, "assets_dir", lambda: tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DemoModelMissingError, match="model.safetensors, tokenizer.model") as err:
        demo.default_model_path()
    assert "python -m mlx_core.demo.build" in str(err.value)


def test_loads_as_a_mistral_model_folder(demo_model, build_record) -> None:
    args = demo_model.args
    assert demo_model.source_format == "hf"
    assert args.n_kv_heads < args.n_heads  # grouped-query attention, as Mistral-7B
    assert args.vocab_size == demo_model.tokenizer.vocab_size
    tok = demo_model.tokenizer
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # what the shipped tokenizer_config.json names
    text = "table: 1-123-4\ncolumns: Peak, Elevation (m)\nQ: Ünïcode ok?\nA:"
    assert tok.decode(tok.encode(text)) == text  # byte fallback: any text round-trips
    assert build_record["held_out"]["parts"] == HELD_OUT_PARTS


def test_answers_a_table_of_words_it_never_saw(demo_model) -> None:
    [done] = complete(demo_model.model, demo_model.tokenizer, [README_PROMPT])
    assert done.stopped
    assert done.text == (
        "SELECT Destination FROM table_992 WHERE Opened = 'November 18, 1926' AND Founder = 'Chile'"
    )


@pytest.mark.slow
def test_writes_sql_that_runs_on_unseen_tables_and_stops(demo_model) -> None:
    examples = generate_examples(40, seed=FRESH_SEED, part="train")
    quality = sql_quality(demo_model.model, demo_model.tokenizer, examples)
    assert quality.stop_rate == 1.0, quality
    assert quality.execution >= 0.9, quality


@pytest.mark.slow
def test_answers_through_the_chat_template_too(demo_model) -> None:
    # /v1/chat/completions renders one user turn with the Mistral template; the model must
    # answer that as it answers "...\nA:".
    examples = generate_examples(40, seed=FRESH_SEED + 1, part="train")
    quality = sql_quality(demo_model.model, demo_model.tokenizer, examples, chat=True)
    assert quality.stop_rate == 1.0, quality
    assert quality.execution >= 0.9, quality


@pytest.mark.slow
def test_reads_columns_and_values_of_held_out_words(demo_model) -> None:
    # Every column and value is a word the build kept out of training (build: 70.4 %).
    examples = generate_examples(80, seed=FRESH_SEED + 2, part="vocabulary")
    quality = sql_quality(demo_model.model, demo_model.tokenizer, examples)
    assert quality.stop_rate >= 0.98, quality
    assert quality.execution >= 0.55, quality


@pytest.mark.slow
def test_held_out_phrasing_is_partly_read_and_french_is_not(demo_model) -> None:
    # New question templates are read some of the time (build: 31.8 %); French, the fine-tuning
    # showcase, must stay out of reach of the base model (build: 0.4 %), or the showcase shows
    # nothing.
    phrasing = generate_examples(80, seed=FRESH_SEED + 3, part="phrasing")
    french = generate_examples(80, seed=FRESH_SEED + 4, part="french")
    read = sql_quality(demo_model.model, demo_model.tokenizer, phrasing)
    unread = sql_quality(demo_model.model, demo_model.tokenizer, french)
    assert read.execution >= 0.15, read
    assert unread.execution <= 0.1, unread


def test_build_record_reports_the_targets(build_record) -> None:
    metrics = build_record["metrics"]
    assert metrics["synthetic_test"]["execution"] >= 0.9
    assert metrics["synthetic_test"]["stop_rate"] >= 0.99
    assert metrics["synthetic_test_chat"]["execution"] >= 0.9
    assert metrics["wikisql_test"]["execution"] >= 0.25  # issue 14's WikiSQL target
    assert {f"held_out_{p}" for p in HELD_OUT_PARTS[:2]} | {"french"} <= set(metrics)
