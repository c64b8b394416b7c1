"""`loraforge worker` (train queued jobs without serving) and `loraforge jobs ...` (a client).

`jobs create|list|get|watch|cancel|events` talk HTTP to a running server: `--base-url`
(env LORAFORGE_BASE_URL, default http://127.0.0.1:8000) and `--api-key` (env LORAFORGE_API_KEY).
`jobs create --training-file` takes a file id or a local path, which is uploaded first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from mlx_core.errors import LoraforgeError
from mlx_core.train.events import format_duration
from server.settings import Settings

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
FINISHED = ("succeeded", "failed", "cancelled")
WORKER_SETTINGS = [
    "model",
    "served_model_name",
    "data_dir",
    "database_url",
    "max_concurrent_jobs",
    "job_devices",
    "job_max_attempts",
    "job_retry_backoff_s",
    "max_lora_rank",
    "log_level",
]
WATCH_POLL_S = 1.0
_BAR_WIDTH = 24


def register(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser(
        "worker",
        help="train queued fine-tune jobs in this process (no serving); "
        "use the same --model/--data-dir as the server",
    )
    Settings.add_arguments(w, WORKER_SETTINGS)
    w.add_argument(
        "--devices",
        dest="job_devices",
        type=int,
        default=None,
        metavar="N",
        help="the same as --job-devices: processes (GPUs) each job trains on",
    )
    w.set_defaults(run=run_worker, reports_blas=True)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--base-url",
        # An empty LORAFORGE_BASE_URL= (a shell habit) means the default, as unset does.
        default=os.environ.get("LORAFORGE_BASE_URL") or DEFAULT_BASE_URL,
        help=f"the server [env LORAFORGE_BASE_URL; default {DEFAULT_BASE_URL}]",
    )
    client.add_argument(
        "--api-key",
        default=os.environ.get("LORAFORGE_API_KEY") or None,
        help="the server's API key [env LORAFORGE_API_KEY]",
    )
    jobs = sub.add_parser("jobs", help="fine-tune jobs on a running server")
    actions = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)

    c = actions.add_parser("create", parents=[client], help="create a job (prints its id)")
    c.add_argument(
        "--training-file",
        required=True,
        metavar="FILE_ID_OR_PATH",
        help="an uploaded file's id, or a local .jsonl path to upload first",
    )
    c.add_argument("--validation-file", metavar="FILE_ID_OR_PATH")
    c.add_argument("--model", help="the base model (default: the one the server serves)")
    c.add_argument("--suffix", help="part of the model name ft:<base>:<suffix>:<job id>")
    c.add_argument("--seed", type=int)
    c.add_argument("--n-epochs", type=_int_or_auto, default="auto", help="1-50 or auto")
    c.add_argument("--batch-size", type=_int_or_auto, default="auto", help="1-256 or auto")
    c.add_argument(
        "--learning-rate-multiplier",
        type=_float_or_auto,
        default="auto",
        help="learning rate = 1e-5 x this (auto: 10)",
    )
    c.add_argument("--lora-rank", type=int, dest="rank")
    c.add_argument("--lora-alpha", type=float, dest="alpha")
    c.add_argument("--lora-dropout", type=float, dest="dropout")
    c.add_argument("--lora-layers", type=int, dest="num_layers", help="adapt the last N layers")
    c.add_argument(
        "--targets",
        type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
        help="comma-separated projections, e.g. q_proj,v_proj",
    )
    c.add_argument("--max-seq-len", type=int)
    c.add_argument("--quantize", type=int, choices=[4, 8])
    c.add_argument("--mask-prompt", action="store_true", default=None)
    c.add_argument("--completion-after", help="where a text example's answer starts, e.g. 'A:'")
    c.add_argument("--watch", action="store_true", help="then follow it until it ends")
    c.set_defaults(run=run_create)

    actions.add_parser("list", parents=[client], help="jobs, newest first").set_defaults(
        run=run_list
    )
    for name, run, text in (
        ("get", run_get, "a job as JSON"),
        ("cancel", run_cancel, "cancel a job"),
        ("events", run_events, "a job's events, oldest first"),
        ("watch", run_watch, "follow a job's progress until it ends"),
    ):
        p = actions.add_parser(name, parents=[client], help=text)
        p.add_argument("job_id")
        p.set_defaults(run=run)
    for p in actions.choices.values():
        p.set_defaults(needs_mlx=False)


def _int_or_auto(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _float_or_auto(text: str) -> float | str:
    return text if text == "auto" else float(text)


# -- `loraforge worker` -------------------------------------------------------------------------
def run_worker(ns: argparse.Namespace) -> int:
    import logging.config

    from server.app import logging_config
    from server.db import upgrade_database
    from server.jobs.worker import JobWorker

    settings = Settings.from_args(ns)
    if settings.max_concurrent_jobs < 1:
        raise LoraforgeError(
            "--max-concurrent-jobs 0 leaves the worker nothing to do: use 1 or more"
        )
    logging.config.dictConfig(logging_config(settings.log_level))
    settings.ensure_dirs()
    upgrade_database(settings.database_url)
    worker = JobWorker(settings)
    # SIGTERM/Ctrl-C: stop the trainers and queue their jobs again (they resume from checkpoints).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stopping.set())
    try:
        worker.run()
    finally:
        worker.db.close()
    return 0


# -- the HTTP client ----------------------------------------------------------------------------
def _client(ns: argparse.Namespace) -> httpx.Client:
    base = ns.base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    return httpx.Client(base_url=f"{base}/v1", headers=headers, timeout=60)


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        r = client.request(method, path, **kwargs)
    except httpx.HTTPError as e:
        raise LoraforgeError(
            f"cannot reach {client.base_url} ({e}): start the server with `loraforge "
            "serve`, or pass --base-url / LORAFORGE_BASE_URL"
        ) from None
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise LoraforgeError(error.get("message") or f"HTTP {r.status_code} from {r.url}")
    return body


def _file_id(client: httpx.Client, value: str) -> str:
    path = Path(value).expanduser()
    if not path.is_file():
        if value.startswith("file-"):
            return value
        raise LoraforgeError(
            f"{value} is neither a file id (file-...) nor a local file: pass one of them"
        )
    with path.open("rb") as f:
        uploaded = _call(
            client, "POST", "/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"}
        )
    print(f"uploaded {path} as {uploaded['id']}", file=sys.stderr)
    return uploaded["id"]


def run_create(ns: argparse.Namespace) -> int:
    lora_fields = (
        "rank",
        "alpha",
        "dropout",
        "num_layers",
        "targets",
        "max_seq_len",
        "quantize",
        "mask_prompt",
        "completion_after",
    )
    with _client(ns) as client:
        model = ns.model
        if model is None:  # the base model is the card that is its own root
            cards = _call(client, "GET", "/models")["data"]
            model = next(c["id"] for c in cards if c.get("root") in (None, c["id"]))
        body: dict[str, Any] = {
            "model": model,
            "training_file": _file_id(client, ns.training_file),
            "hyperparameters": {
                "n_epochs": ns.n_epochs,
                "batch_size": ns.batch_size,
                "learning_rate_multiplier": ns.learning_rate_multiplier,
            },
        }
        if ns.validation_file:
            body["validation_file"] = _file_id(client, ns.validation_file)
        for name in ("suffix", "seed"):
            if getattr(ns, name) is not None:
                body[name] = getattr(ns, name)
        lora = {k: getattr(ns, k) for k in lora_fields if getattr(ns, k) is not None}
        if lora:
            body["lora"] = lora
        job = _call(client, "POST", "/fine_tuning/jobs", json=body)
        print(f"created {job['id']} ({job['status']}) on {job['model']}", file=sys.stderr)
        print(job["id"], flush=True)
        return _watch(client, job["id"]) if ns.watch else 0


def run_list(ns: argparse.Namespace) -> int:
    with _client(ns) as client:
        rows = _call(client, "GET", "/fine_tuning/jobs", params={"limit": 100})["data"]
    print(f"{'ID':32} {'STATUS':10} {'CREATED':19} FINE-TUNED MODEL")
    for j in rows:
        print(
            f"{j['id']:32} {j['status']:10} {_time(j['created_at'], '%Y-%m-%d %H:%M:%S')} "
            f"{j.get('fine_tuned_model') or '-'}"
        )
    return 0


def run_get(ns: argparse.Namespace) -> int:
    with _client(ns) as client:
        print(json.dumps(_call(client, "GET", f"/fine_tuning/jobs/{ns.job_id}"), indent=2))
    return 0


def run_cancel(ns: argparse.Namespace) -> int:
    with _client(ns) as client:
        job = _call(client, "POST", f"/fine_tuning/jobs/{ns.job_id}/cancel")
    print(f"{job['id']} {job['status']}")
    return 0


def run_events(ns: argparse.Namespace) -> int:
    with _client(ns) as client:
        for event in _new_events(client, ns.job_id, 0):
            print(_line(event))
    return 0


def run_watch(ns: argparse.Namespace) -> int:
    with _client(ns) as client:
        return _watch(client, ns.job_id)


# -- watching -----------------------------------------------------------------------------------
def _number(event_id: str) -> int:
    return int(event_id.rpartition("-")[2])


def _new_events(client: httpx.Client, job_id: str, seen: int) -> list[dict[str, Any]]:
    """Events after event number `seen`, oldest first (the API pages newest first)."""
    found: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = _call(client, "GET", f"/fine_tuning/jobs/{job_id}/events", params=params)
        fresh = [e for e in page["data"] if _number(e["id"]) > seen]
        found += fresh
        if not page.get("has_more") or len(fresh) < len(page["data"]) or not fresh:
            return found[::-1]
        params["after"] = fresh[-1]["id"]


def _time(ts: int, fmt: str = "%H:%M:%S") -> str:
    return time.strftime(fmt, time.localtime(ts))


def _line(event: dict[str, Any]) -> str:
    level = "" if event["level"] == "info" else f"[{event['level']}] "
    return f"{_time(event['created_at'])} {level}{event['message']}"


def _eta(job: dict[str, Any]) -> str:
    """ " ETA 3m05s" from the job's estimated_finish (the server's measured step rate)."""
    finish = job.get("estimated_finish")
    if not finish or job.get("status") != "running":
        return ""
    return f" ETA {format_duration(finish - time.time())}"


def _watch(client: httpx.Client, job_id: str) -> int:
    """Print events as they come until the job ends (a redrawn bar on a terminal); exit code 0
    only when it succeeded."""
    tty = sys.stdout.isatty()
    seen, bar = 0, ""
    while True:
        job = _call(client, "GET", f"/fine_tuning/jobs/{job_id}")  # before the events: none lost
        for event in _new_events(client, job["id"], seen):
            seen = _number(event["id"])
            data = event.get("data") or {}
            if tty and event.get("type") == "metrics" and "train_loss" in data:
                done = int(_BAR_WIDTH * data["step"] / max(data.get("total_steps") or 1, 1))
                bar = (
                    f"[{'#' * done}{'.' * (_BAR_WIDTH - done)}] step {data['step']}/"
                    f"{data.get('total_steps')} loss {data['train_loss']:.3f}{_eta(job)}"
                )
                print(f"\r\033[K{bar}", end="", flush=True)
                continue
            if tty and event.get("type") == "metrics":
                continue  # validation losses: the bar shows training; `events` lists them all
            line = _line(event) + (_eta(job) if event.get("type") == "metrics" else "")
            print(f"\r\033[K{line}" if tty else line, flush=True)
            if bar:
                print(bar, end="", flush=True)
        if job["status"] in FINISHED:
            if bar:
                print(flush=True)
            if job["status"] == "succeeded":
                print(f"{job['id']} succeeded: use model={job['fine_tuned_model']}")
                return 0
            reason = (job.get("error") or {}).get("message", "")
            print(f"{job['id']} {job['status']}{': ' + reason if reason else ''}", file=sys.stderr)
            return 1
        time.sleep(WATCH_POLL_S)
