"""Clean + tokenize at scale: time, memory and CPU use at two corpus sizes.

Runs the real stages (`python -m stages.clean`, `python -m stages.tokenize`) on synthetic
corpora (benchmarks/synthetic_corpus.py) of a small and a large size, while sampling the
whole process tree (stage process, its worker processes, Rust threads) for resident
memory and CPU time. Prints, per stage and size: wall time, MB/s, peak RSS of the tree,
CPU utilisation of all cores; then the growth ratio large/small and the straight line
through both points (a fixed start-up cost plus seconds per MB).

    python benchmarks/data_scale.py                  # 100 MB and 1000 MB (about 25 min on 2 cores)
    python benchmarks/data_scale.py --sizes 20 200   # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_corpus import generate

REPO = Path(__file__).resolve().parents[1]
RSS_LIMIT_GB = 3.0


@dataclass
class Measure:
    seconds: float
    peak_rss_gb: float
    cpu_seconds: float

    @property
    def utilisation(self) -> float:
        """Share of all cores kept busy over the run (1.0 = every core, all the time)."""
        return self.cpu_seconds / (self.seconds * (os.cpu_count() or 1))


def run_measured(cmd: list[str], env: dict[str, str], log_path: Path) -> Measure:
    """Run `cmd`, sampling the RSS and CPU time of its whole process tree every 0.1 s."""
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        peak = 0
        cpu: dict[tuple[int, float], float] = {}  # (pid, start time) -> last CPU seconds seen
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss = 0
            for p in tree:
                try:
                    with p.oneshot():
                        rss += p.memory_info().rss
                        times = p.cpu_times()
                        cpu[(p.pid, p.create_time())] = times.user + times.system
                except psutil.NoSuchProcess:
                    continue
            peak = max(peak, rss)
            time.sleep(0.1)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log_path}")
    return Measure(seconds, peak / 1e9, sum(cpu.values()))


def run_size(mb: int, work: Path) -> dict[str, Measure]:
    corpus = generate(mb)
    outputs = work / f"outputs-{mb}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "PYTHONUNBUFFERED": "1",
    }
    common = [f"outputs_dir={outputs}", f"hydra.run.dir={work / 'hydra' / str(mb)}"]
    results = {}
    for stage, extra in (
        ("clean", ["data.kind=local", f"data.paths=[{corpus}]", "data.text_field=text"]),
        ("tokenize", []),
    ):
        cmd = [sys.executable, "-m", f"stages.{stage}", *common, *extra]
        results[stage] = run_measured(cmd, env, work / f"{stage}-{mb}.log")
        stats = json.loads((outputs / stage / "stats.json").read_text())
        m = results[stage]
        print(
            f"{stage:>9} {mb:>6} MB  {m.seconds:8.1f} s  {mb / m.seconds:6.2f} MB/s  "
            f"peak RSS {m.peak_rss_gb:5.2f} GB  CPU {100 * m.utilisation:5.1f}% of "
            f"{os.cpu_count()} cores",
            flush=True,
        )
        if stage == "clean":
            print(
                f"{'':>9} docs {stats['docs_in']:,} -> {stats['docs_out']:,}; dropped "
                f"{ {k[8:]: v for k, v in stats.items() if k.startswith('dropped_') and v} }"
            )
        else:
            print(
                f"{'':>9} {stats['train_tokens'] + stats['val_tokens']:,} tokens, "
                f"{stats['chars_per_token']:.2f} chars/token, encode "
                f"{stats['tokens_per_second']:,.0f} tokens/s, BPE training "
                f"{stats['tokenizer_train_seconds']:.1f} s"
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[100, 1000], metavar="MB")
    parser.add_argument("--keep", action="store_true", help="keep the outputs directory")
    args = parser.parse_args()
    small, large = args.sizes
    work = Path(tempfile.mkdtemp(prefix="lmpipe-scale-"))
    print(f"work dir {work}; {os.cpu_count()} cores")
    measured = {mb: run_size(mb, work) for mb in (small, large)}
    print(f"\nsize ratio {large / small:.1f}x")
    for stage in ("clean", "tokenize"):
        a, b = measured[small][stage], measured[large][stage]
        growth = b.seconds / a.seconds
        # time = start-up + size / rate: a straight line through both points
        per_mb = (b.seconds - a.seconds) / (large - small)
        startup = a.seconds - per_mb * small
        print(
            f"{stage:>9}: time ratio {growth:5.2f}x for {large / small:.0f}x the data; "
            f"fit {startup:.1f} s start-up + {per_mb:.3f} s/MB ({1 / per_mb:.2f} MB/s); "
            f"peak RSS {b.peak_rss_gb:.2f} GB "
            f"({'<' if b.peak_rss_gb < RSS_LIMIT_GB else '>='} {RSS_LIMIT_GB} GB); "
            f"CPU {100 * b.utilisation:.0f}%"
        )
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
