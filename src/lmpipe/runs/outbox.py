"""Send or save: what the tracking store did not take is kept on disk and replayed later.

A tracking server that goes away mid-run must not kill or stall training. The first failed
call marks the store unreachable for the rest of the process (one loud warning, no more
waiting on timeouts), and every later write goes straight to the outbox:
`<project>/mlflow-outbox/<run id>.jsonl`, one JSON record per write, in order, with copies of
the files meant as artifacts. `lmpipe replay` (also tried at the start of every stage) sends
the records, oldest first, and removes what was delivered.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

OUTBOX_DIR = "mlflow-outbox"

_unreachable: str | None = None  # why the store was given up on, once it failed


def reset() -> None:
    """Forget an earlier failure (a new process state, or a test)."""
    global _unreachable
    _unreachable = None


class Outbox:
    """The records of one project's undelivered writes, one JSON-lines file per run."""

    def __init__(self, root: Path) -> None:
        self.directory = root / OUTBOX_DIR

    @contextlib.contextmanager
    def _locked(self, wait: bool = True) -> Iterator[bool]:
        """The outbox to ourselves: writers (threads or processes) and a replay never
        interleave, so a replay cannot delete a record appended while it was sending."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / ".lock").open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _append(self, run_id: str, record: dict[str, Any]) -> None:
        """Append under the lock, which the caller holds."""
        with (self.directory / f"{run_id}.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def save_metrics(self, run_id: str, metrics: Iterable[Metric]) -> None:
        rows = [[m.key, m.value, m.timestamp, m.step] for m in metrics]
        with self._locked():
            self._append(run_id, {"kind": "metrics", "metrics": rows})

    def save_artifact(self, run_id: str, local_path: Path, artifact_path: str | None) -> None:
        # A copy: the original may be a temporary file, or replaced by the next run. Copied
        # under the lock, so a replay never removes it before its record is written.
        with self._locked():
            copy = self.directory / f"{run_id}.files" / uuid.uuid4().hex / local_path.name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local_path, copy)
            record = {
                "kind": "artifact",
                "path": str(copy.relative_to(self.directory)),
                "artifact_path": artifact_path,
            }
            self._append(run_id, record)

    def save_end(self, run_id: str, status: str) -> None:
        with self._locked():
            self._append(run_id, {"kind": "end", "status": status, "time": int(time.time() * 1000)})

    def pending(self) -> list[Path]:
        return sorted(self.directory.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)

    def replay(self, client: MlflowClient | None = None) -> int:
        """Send every saved record; returns how many runs were completely delivered. A run whose
        records fail stays saved from the first undelivered record on. Another process
        replaying at the same time is left to it."""
        client = client or MlflowClient()
        delivered = 0
        with self._locked(wait=False) as mine:
            if not mine:
                log.info("another process is replaying %s", self.directory)
                return 0
            for journal in self.pending():
                if not self._replay_run(client, journal):
                    break
                delivered += 1
        return delivered

    def _replay_run(self, client: MlflowClient, journal: Path) -> bool:
        run_id = journal.stem
        records = [json.loads(line) for line in journal.read_text().splitlines() if line]
        for index, record in enumerate(records):
            try:
                _send_record(client, run_id, record, self.directory)
            except Exception as err:  # still unreachable: keep the rest for next time
                log.warning("replay of run %s stopped at record %d of %d: %s",
                            run_id, index + 1, len(records), err)  # fmt: skip
                journal.write_text("".join(json.dumps(r) + "\n" for r in records[index:]))
                return False
        journal.unlink()
        shutil.rmtree(self.directory / f"{run_id}.files", ignore_errors=True)
        log.info("replayed %d saved records of run %s", len(records), run_id)
        return True


def log_metrics(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    """Any number of metric values, in the batches of at most 1000 that log_batch takes."""
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def _send_record(
    client: MlflowClient, run_id: str, record: dict[str, Any], directory: Path
) -> None:
    if record["kind"] == "metrics":
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
        log_metrics(client, run_id, metrics)
    elif record["kind"] == "artifact":
        client.log_artifact(run_id, str(directory / record["path"]), record["artifact_path"])
    elif record["kind"] == "end":
        client.set_terminated(run_id, record["status"], end_time=record["time"])
    else:
        raise ValueError(f"unknown outbox record kind {record['kind']!r}")


def send_or_save(
    what: str, send: Callable[[], None], save: Callable[[], None], where: Path
) -> bool:
    """Try `send` unless the store already failed in this process; else `save`. True if sent.

    The first failure is reported once, loudly, with where the unsent data is kept.
    """
    global _unreachable
    if _unreachable is None:
        try:
            send()
            return True
        except Exception as err:  # any store failure: the run goes on, the data is saved
            _unreachable = f"{type(err).__name__}: {err}"
            log.warning(
                "MLflow tracking store unreachable while sending %s (%s). Training goes on; "
                "the metrics are still written to the stage's DVC files, and everything not "
                "sent is saved in %s. `lmpipe replay` sends it when the store is back "
                "(every stage start tries too).",
                what, _unreachable, where,
            )  # fmt: skip
    save()
    return False
