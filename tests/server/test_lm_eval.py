"""lm-evaluation-harness's own `local-completions` model against the real server, on local tasks.

The harness tokenizes with the server (`tokenizer_backend=remote`: /tokenizer_info, /tokenize,
/detokenize), sends loglikelihood requests as `echo: true, logprobs: 1` and reads
`token_logprobs[ctxlen:-1]`; so its numbers are right only if the server's tokenization, BOS and
echoed logprobs line up exactly. They must equal the model's own scores, computed in process.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.settings import Settings
from tests.scoring import continuation_logprob
from tests.serving import start_model_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLES = [
    {
        "table": "players",
        "question": "How many players are there?",
        "choices": ["SELECT COUNT(*) FROM players", "SELECT name FROM players"],
        "answer": 0,
    },
    {
        "table": "schools",
        "question": "Which schools are in Ohio?",
        "choices": ["SELECT COUNT(*) FROM schools", "SELECT name FROM schools WHERE state = 'OH'"],
        "answer": 1,
    },
    {
        "table": "songs",
        "question": "What is the longest song?",
        "choices": [
            "SELECT title FROM songs ORDER BY length DESC LIMIT 1",
            "SELECT MIN(length) FROM songs",
            "SELECT title FROM songs",
        ],
        "answer": 0,
    },
]
PROMPT = "table: {{table}}\nQ: {{question}}\nA:"


def _context(doc: dict) -> str:
    return f"table: {doc['table']}\nQ: {doc['question']}\nA:"


def _write_tasks(folder: Path) -> None:
    data = folder / "sql.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": PROMPT,
    }
    choice = {
        "task": "sql_choice",
        "output_type": "multiple_choice",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
        **common,
    }
    generate = {
        "task": "sql_generate",
        "output_type": "generate_until",
        "doc_to_target": "{{choices[answer]}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
        **common,
    }
    # JSON is YAML: the harness reads these as it reads its own task files.
    (folder / "sql_choice.yaml").write_text(json.dumps(choice))
    (folder / "sql_generate.yaml").write_text(json.dumps(generate))


@pytest.fixture(scope="module")
def server(tiny_hf_model, tmp_path_factory):
    settings = Settings(
        model=str(tiny_hf_model),
        data_dir=tmp_path_factory.mktemp("data"),
        served_model_name="tiny",
        start_worker=False,
    )
    with start_model_server(settings) as (url, _engine):
        yield url


def _evaluate(url: str, tasks: Path, tokenized_requests: bool) -> dict:
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="local-completions",
        model_args={
            "model": "tiny",
            "base_url": f"{url}/v1/completions",
            "tokenizer_backend": "remote",
            "tokenized_requests": tokenized_requests,
            "max_length": 512,
            "max_retries": 1,
        },
        tasks=["sql_choice", "sql_generate"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    assert results is not None
    return results


def _loglikelihoods(results: dict) -> list[list[float]]:
    samples = sorted(results["samples"]["sql_choice"], key=lambda s: s["doc_id"])
    return [[resp[0][0] for resp in s["resps"]] for s in samples]


def _generations(results: dict) -> list[str]:
    samples = sorted(results["samples"]["sql_generate"], key=lambda s: s["doc_id"])
    return [s["resps"][0][0] for s in samples]


def test_lm_eval_scores_the_served_model_as_the_model_itself(
    server, tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    _write_tasks(tmp_path)

    as_tokens = _evaluate(server, tmp_path, tokenized_requests=True)
    as_text = _evaluate(server, tmp_path, tokenized_requests=False)

    expected = [
        [continuation_logprob(tiny_model, _context(doc), " " + c) for c in doc["choices"]]
        for doc in EXAMPLES
    ]
    for got in (_loglikelihoods(as_tokens), _loglikelihoods(as_text)):
        assert len(got) == len(expected)
        for row, want in zip(got, expected):
            assert row == pytest.approx(want, rel=1e-4, abs=1e-3)
    acc = [r["results"]["sql_choice"]["acc,none"] for r in (as_tokens, as_text)]
    assert acc[0] == acc[1] and not math.isnan(acc[0])

    # Greedy generations: the same text whether the harness sends token ids or strings.
    generated = _generations(as_tokens)
    assert len(generated) == len(EXAMPLES) and all(isinstance(g, str) for g in generated)
    assert generated == _generations(as_text)
    assert (
        as_tokens["results"]["sql_generate"]["exact_match,none"]
        == as_text["results"]["sql_generate"]["exact_match,none"]
    )


def test_the_documented_lm_eval_command_runs(server, tmp_path):
    """docs/openai-client.md's task files and `lm_eval` command, run as written (the server's
    address and model name swapped in), in a subprocess like a user's shell."""
    docs = (Path(__file__).parents[2] / "docs" / "openai-client.md").read_text()
    section = docs[docs.index("## Evaluating with lm-evaluation-harness") :]
    setup, command = re.findall(r"```bash\n(.*?)```", section, re.S)[:2]
    assert "tokenizer_backend=remote" in command
    command = command.replace("http://127.0.0.1:8000", server).replace("loraforge-demo", "tiny")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
    }
    run = subprocess.run(
        ["bash", "-euc", f"{setup}\n{command}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = run.stdout
    assert re.search(r"\|sql_choice\s*\|.*\|acc\s*\|", table), table
    assert re.search(r"\|sql_generate\s*\|.*\|exact_match\|", table), table
