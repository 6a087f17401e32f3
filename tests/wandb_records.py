"""Read an offline W&B run (``run-<id>.wandb``) back, to test what was logged without a server.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic, version) then LevelDB-log framed
records (32 KiB blocks; each chunk: crc32 (4), length (2, little endian), type (1): 1 full, 2 first,
3 middle, 4 last), each record a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: str | Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def logged_run(run_dir: str | Path, wait_s: float = 10.0) -> dict:
    """``{"config": {key: value}, "history": [row dicts], "summary": {key: value}, "complete": True}`` of an offline run.

    W&B's service process can still be writing the log after ``wandb.finish()`` returns: CI has seen both a
    protobuf ``DecodeError`` (a half-written last record) and a log that parsed but did not yet hold the config.
    The log is complete once its ``exit`` record is there, so the file is re-read until it parses and holds
    that record, or ``wait_s`` has passed; then the last error is raised (a log that never completes fails).
    """
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            run = _parse_run(run_dir)
            if run["complete"]:
                return run
            error: Exception = AssertionError(f"{run_dir}: the W&B log has no exit record after {wait_s} s")
        except DecodeError as exc:
            error = exc
        if time.monotonic() > deadline:
            raise error
        time.sleep(0.5)


def _parse_run(run_dir: str | Path) -> dict:
    (log_file,) = Path(run_dir).glob("run-*.wandb")
    out: dict = {"config": {}, "history": [], "summary": {}, "complete": False}
    for rec in read_records(log_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":  # config passed to wandb.init travels in the run record
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "exit":
            out["complete"] = True
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in rec.summary.update})
    return out
