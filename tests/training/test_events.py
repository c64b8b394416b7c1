"""The trainer's events file as the worker reads it: one typed event per line, the same JSON keys
as always, and lines that are not events (torn, or from another version) skipped."""

from __future__ import annotations

import json
import math

from mlx_core.train.config import TrainConfig
from mlx_core.train.events import (
    DoneEvent,
    ErrorEvent,
    EvalEvent,
    StartEvent,
    TrainLog,
    WarningEvent,
    decode_event,
    encode_event,
)


def test_events_round_trip_with_their_json_keys(tmp_path):
    path = tmp_path / "events.jsonl"
    log = TrainLog(path, None, active=True, progress="none")
    start = StartEvent(
        step=0,
        iters=4,
        trainable_parameters=64,
        world_size=1,
        train_examples=8,
        valid_examples=2,
        resumed_from=None,
        config=TrainConfig(iters=4, targets=("q_proj", "o_proj")),
    )
    log.start(start)
    log.warning(
        0, "no_validation_data", "no valid.jsonl in data: training without a validation loss"
    )
    log.eval_report(2, math.inf, 0.5)  # a diverging run's loss stays a number
    log.event(DoneEvent(step=2, status="failed", reason="loss is not finite"))
    log.close()

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [list(e)[:3] for e in lines] == [["type", "step", "time"]] * 4
    assert (
        lines[0]["config"]["targets"] == ["q_proj", "o_proj"] and lines[0]["resumed_from"] is None
    )
    assert lines[1]["code"] == "no_validation_data"
    assert lines[2]["val_loss"] == math.inf
    assert set(lines[3]) == {"type", "step", "time", "status", "reason"}  # no success fields

    events = [decode_event(line) for line in path.read_bytes().splitlines()]
    assert events[0] == start
    assert isinstance(events[1], WarningEvent) and events[1].code == "no_validation_data"
    assert isinstance(events[2], EvalEvent) and events[2].val_loss == math.inf
    assert isinstance(events[3], DoneEvent) and events[3].reason == "loss is not finite"


def test_lines_that_are_not_events_are_skipped():
    assert decode_event(b'{"type": "tr') is None  # still being written
    assert decode_event(b'{"type": "future", "step": 1, "time": 0.0}') is None
    assert decode_event(b'{"type": "train", "step": 1}') is None  # not a train event's fields
    assert decode_event(b"[1, 2]") is None
    error = ErrorEvent(step=0, code="insufficient_memory", message="lower the batch size")
    assert decode_event(encode_event(error)) == error
    # Written before warnings had codes: still a warning, of no known kind.
    old = decode_event(b'{"type": "warning", "step": 0, "time": 1.0, "message": "x"}')
    assert isinstance(old, WarningEvent) and (old.code, old.message) == ("unspecified", "x")
