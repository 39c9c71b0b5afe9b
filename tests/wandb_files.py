"""Read back what an offline W&B run wrote, from its `run-*.wandb` file alone.

The file is a LevelDB-style log (32 KiB blocks; each chunk = crc32c(4) + length(2, LE) + type(1)
+ payload; FULL=1, FIRST=2, MIDDLE=3, LAST=4) after a 7-byte ':W&B' header; each record is a
`wandb_internal_pb2.Record`. wandb 0.31 ships no Python reader for it, hence this test helper.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_HEADER = 7
_BLOCK = 32 * 1024
_CHUNK_HEADER = 7


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, pos = [], b"", _HEADER
    while pos + _CHUNK_HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK_HEADER:  # block trailer padding
            pos += _BLOCK - pos % _BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += _CHUNK_HEADER + length
        if kind == 0 and length == 0:
            continue
        pending += payload
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def run_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("**/wandb/offline-run-*/run-*.wandb"))


def summary(path: Path) -> dict[str, Any]:
    """The run's final summary (last value of each key)."""
    values: dict[str, Any] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                values[key] = json.loads(item.value_json)
    return values


def run_info(path: Path) -> dict[str, Any]:
    """Name, group, job type and config of the run."""
    info: dict[str, Any] = {"config": {}}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            info.update(name=run.display_name, group=run.run_group, job_type=run.job_type)
            for item in run.config.update:
                info["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                info["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "exit":
            info["exit_code"] = record.exit.exit_code
    return info
