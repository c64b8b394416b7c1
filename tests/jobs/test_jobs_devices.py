"""Fine-tune jobs on several processes: `--job-devices 2` starts each trainer under mlx.launch
(the ring backend on this CPU), and the job trains, reports and stops like a one-process one."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import openai
import pytest

from server.settings import Settings
from tests.jobs.test_jobs import wait_for_job, wikisql_file
from tests.serving import start_model_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # real trainer processes


def _ranks_of(spec: Path) -> list[int]:
    """Pids of live processes whose command line names this job's spec (the ranks, the launcher)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if str(spec) in cmdline and "mlx_core.train" in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def _train_losses(client: openai.OpenAI, job_id: str) -> list[float]:
    events = client.fine_tuning.jobs.list_events(job_id, limit=100).data[::-1]
    return [
        e.data["train_loss"]
        for e in events
        if e.type == "metrics" and isinstance(e.data, dict) and "train_loss" in e.data
    ]


def test_two_ring_ranks_train_a_job_like_one_process_and_cancel_stops_all(tiny_hf_model, tmp_path):
    train = wikisql_file(tmp_path, "train", 8)
    losses: dict[int, list[float]] = {}
    for devices in (1, 2):
        settings = Settings(
            model=str(tiny_hf_model),
            served_model_name="tiny",
            data_dir=tmp_path / f"data-{devices}",
            job_devices=devices,
        )
        with start_model_server(settings) as (url, _):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            file_id = client.files.create(file=train, purpose="fine-tune").id
            job = client.fine_tuning.jobs.create(
                model="tiny",
                training_file=file_id,
                seed=7,
                hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 100},
            )
            assert wait_for_job(client, job.id).status == "succeeded"
            losses[devices] = _train_losses(client, job.id)
            # `devices` processes trained it (each says which BLAS it uses), and only rank 0
            # wrote events: one start, saying the world size.
            log = (settings.jobs_dir / job.id / "train.log").read_text()
            assert log.count("fp32 matmuls") == devices
            lines = (settings.jobs_dir / job.id / "events.jsonl").read_text().splitlines()
            starts = [json.loads(x) for x in lines if '"type": "start"' in x]
            assert [e["world_size"] for e in starts] == [devices]
            if devices == 2:
                # Cancel while training: every rank and the launcher are gone within seconds.
                long = client.fine_tuning.jobs.create(
                    model="tiny",
                    training_file=file_id,
                    hyperparameters={"n_epochs": 50, "batch_size": 2},
                )
                wait_for_job(client, long.id, until=("running",))
                spec = settings.jobs_dir / long.id / "spec.json"
                deadline = time.monotonic() + 60
                while len(_ranks_of(spec)) < 2 and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert len(_ranks_of(spec)) >= 2, "the two ranks never started"
                client.fine_tuning.jobs.cancel(long.id)
                assert wait_for_job(client, long.id).status == "cancelled"
                deadline = time.monotonic() + 20
                while _ranks_of(spec) and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert _ranks_of(spec) == []
    assert len(losses[1]) == len(losses[2]) == 4
    # The same global batch on one process or split over two: the same updates, within float
    # tolerance (the ranks sum their halves' gradients in another order).
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-3)


def test_a_killed_launch_resumes_every_rank_from_its_checkpoint(tiny_hf_model, tmp_path):
    settings = Settings(
        model=str(tiny_hf_model),
        served_model_name="tiny",
        data_dir=tmp_path / "data",
        job_devices=2,
        job_retry_backoff_s=0,
    )
    with start_model_server(settings) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        file_id = client.files.create(file=wikisql_file(tmp_path, "train", 8), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="tiny",
            training_file=file_id.id,
            hyperparameters={"n_epochs": 20, "batch_size": 2},
        )
        wait_for_job(client, job.id, until=("running",))
        spec = settings.jobs_dir / job.id / "spec.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # after the first checkpoint, kill the whole launch
            if client.fine_tuning.jobs.checkpoints.list(job.id).data and _ranks_of(spec):
                break
            time.sleep(0.2)
        first_pids = _ranks_of(spec)
        for pid in first_pids:
            os.kill(pid, signal.SIGKILL)
        done = wait_for_job(client, job.id, timeout_s=240)
        assert done.status == "succeeded", done.error
        assert not any(p in _ranks_of(spec) for p in first_pids)
        lines = (settings.jobs_dir / job.id / "events.jsonl").read_text().splitlines()
        starts = [json.loads(x) for x in lines if '"type": "start"' in x]
        # Two runs, each of two ranks: the second resumed from the first's checkpoint.
        assert len(starts) == 2 and starts[1]["resumed_from"] and starts[1]["step"] > 0
        assert all(e["world_size"] == 2 for e in starts)
