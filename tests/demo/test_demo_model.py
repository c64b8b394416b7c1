"""The embedded demo model: it ships, loads like any model folder, and writes SQL that runs.

Prompts come from the synthetic corpus with a seed the build never used, so every table is new
to the model; generation goes through the Engine (greedy, no stop sequences) as the service runs it.
"""

from __future__ import annotations

import json

import pytest

import mlx_core.demo as demo
from mlx_core.demo import ASSET_FILES, DemoModelMissingError, default_model_path
from mlx_core.demo.corpus import generate_examples
from mlx_core.demo.quality import complete, sql_quality
from mlx_core.weights import load_model

MAX_ASSET_BYTES = 20 * 2**20
FRESH_SEED = 20_240_601  # not a seed the build draws its corpus from


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
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    text = "table: 1-123-4\ncolumns: Peak, Elevation (m)\nQ: Ünïcode ok?\nA:"
    assert tok.decode(tok.encode(text)) == text  # byte fallback: any text round-trips
    assert build_record["held_out_domain"] not in ("", None)


@pytest.mark.slow
def test_writes_sql_that_runs_on_unseen_tables_and_stops(demo_model, build_record) -> None:
    held_out = build_record["held_out_domain"]
    examples = generate_examples(30, seed=FRESH_SEED, exclude_domains=(held_out,))
    quality = sql_quality(demo_model.model, demo_model.tokenizer, examples)
    assert quality.stop_rate == 1.0, quality
    assert quality.execution >= 0.9, quality


@pytest.mark.slow
def test_answers_through_the_chat_template_too(demo_model, build_record) -> None:
    # /v1/chat/completions renders one user turn with the Mistral template; the model must
    # answer that as it answers "...\nA:".
    held_out = build_record["held_out_domain"]
    examples = generate_examples(30, seed=FRESH_SEED + 1, exclude_domains=(held_out,))
    quality = sql_quality(demo_model.model, demo_model.tokenizer, examples, chat=True)
    assert quality.stop_rate == 1.0, quality
    assert quality.execution >= 0.9, quality


def test_completion_is_one_sql_statement(demo_model) -> None:
    prompt = (
        "table: 1-555123-7\ncolumns: Ship, Builder, Launched, Fate\n"
        "Q: Which builder has fate Scrapped?\nA:"
    )
    [done] = complete(demo_model.model, demo_model.tokenizer, [prompt])
    assert done.stopped
    assert done.text == "SELECT Builder FROM 1-555123-7 WHERE Fate = 'Scrapped'"


def test_build_record_reports_the_targets(build_record) -> None:
    metrics = build_record["metrics"]
    assert metrics["synthetic_test"]["execution"] >= 0.9
    assert metrics["synthetic_test"]["stop_rate"] >= 0.99
    assert metrics["synthetic_test_chat"]["execution"] >= 0.9
    assert {"held_out_domain", "wikisql_test"} <= set(metrics)
