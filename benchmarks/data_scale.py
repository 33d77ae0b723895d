"""Clean + tokenize at scale: time, memory and CPU use at two corpus sizes, against a
baseline revision measured in the same run.

Runs the real stages (`python -m stages.clean`, `python -m stages.tokenize`) on synthetic
corpora (benchmarks/synthetic_corpus.py) of a small and a large size, while sampling the
whole process tree (stage process, its worker processes, Rust threads) for resident
memory and CPU time. The same runs are made with the code of `--baseline` (a git
revision, checked out in a temporary worktree; default: the last one before the data
stages moved to datatrove). Prints, per stage and size: wall time, MB/s, peak RSS of the
tree, CPU utilisation of all cores, and the ratios to the baseline; then the straight line
through both sizes (a fixed start-up cost plus seconds per MB).

    python benchmarks/data_scale.py                  # 100 MB and 1000 MB (about 40 min on 2 cores)
    python benchmarks/data_scale.py --sizes 20 200   # a quicker look
    python benchmarks/data_scale.py --baseline none  # this code alone
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
# Targets (issue 17): peak RSS of clean at 1 GB, and time against the baseline.
RSS_LIMIT_GB = 1.0
TIME_RATIO_LIMIT = 1.15
BASELINE = "9b7397e"  # clean and tokenize on lmpipe's own process pool


@dataclass
class Measure:
    seconds: float
    peak_rss_gb: float  # the sum of the processes' RSS: pages they share count once each
    cpu_seconds: float
    peak_pss_gb: float  # the sum of their PSS: a shared page split among its sharers

    @property
    def utilisation(self) -> float:
        """Share of all cores kept busy over the run (1.0 = every core, all the time)."""
        return self.cpu_seconds / (self.seconds * (os.cpu_count() or 1))


def run_measured(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> Measure:
    """Run `cmd`, sampling the RSS and CPU time of its whole process tree every 0.1 s."""
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        peak = peak_pss = 0
        cpu: dict[tuple[int, float], float] = {}  # (pid, start time) -> last CPU seconds seen
        samples = 0
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss = pss = 0
            full = samples % 5 == 0  # PSS reads smaps: every 0.5 s
            for p in tree:
                try:
                    with p.oneshot():
                        rss += p.memory_info().rss
                        if full:
                            pss += p.memory_full_info().pss
                        times = p.cpu_times()
                        cpu[(p.pid, p.create_time())] = times.user + times.system
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            peak = max(peak, rss)
            peak_pss = max(peak_pss, pss)
            samples += 1
            time.sleep(0.1)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log_path}")
    return Measure(seconds, peak / 1e9, sum(cpu.values()), peak_pss / 1e9)


def run_size(mb: int, work: Path, code: Path, label: str) -> dict[str, Measure]:
    """Clean then tokenize `mb` MB with the code in `code` (a checkout of the repository)."""
    corpus = generate(mb)
    outputs = work / f"outputs-{label}-{mb}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(code / "src"),
    }
    common = [f"outputs_dir={outputs}", f"hydra.run.dir={work / 'hydra' / label / str(mb)}"]
    results = {}
    for stage, extra in (
        ("clean", ["data.kind=local", f"data.paths=[{corpus}]", "data.text_field=text"]),
        ("tokenize", []),
    ):
        cmd = [sys.executable, "-m", f"stages.{stage}", *common, *extra]
        results[stage] = run_measured(cmd, env, work / f"{label}-{stage}-{mb}.log", code)
        stats = json.loads((outputs / stage / "stats.json").read_text())
        m = results[stage]
        print(
            f"{label:>8} {stage:>9} {mb:>6} MB  {m.seconds:8.1f} s  {mb / m.seconds:6.2f} MB/s  "
            f"peak RSS {m.peak_rss_gb:5.2f} GB (PSS {m.peak_pss_gb:4.2f})  "
            f"CPU {100 * m.utilisation:5.1f}% of "
            f"{os.cpu_count()} cores  ({m.cpu_seconds:.0f} CPU s)",
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


def baseline_checkout(revision: str, work: Path) -> Path:
    path = work / "baseline"
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-q", str(path), revision], cwd=REPO, check=True
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[100, 1000], metavar="MB")
    parser.add_argument("--baseline", default=BASELINE, help="git revision, or 'none'")
    parser.add_argument("--keep", action="store_true", help="keep the outputs directory")
    args = parser.parse_args()
    small, large = args.sizes
    work = Path(tempfile.mkdtemp(prefix="lmpipe-scale-"))
    print(f"work dir {work}; {os.cpu_count()} cores")
    codes = {"lmpipe": REPO}
    if args.baseline != "none":
        codes["baseline"] = baseline_checkout(args.baseline, work)
    measured: dict[str, dict[int, dict[str, Measure]]] = {label: {} for label in codes}
    try:
        for mb in (small, large):
            for label, code in codes.items():
                measured[label][mb] = run_size(mb, work, code, label)
    finally:
        if "baseline" in codes:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(codes["baseline"])], cwd=REPO
            )
    print(f"\nsize ratio {large / small:.1f}x")
    for stage in ("clean", "tokenize"):
        a, b = measured["lmpipe"][small][stage], measured["lmpipe"][large][stage]
        # time = start-up + size / rate: a straight line through both points
        per_mb = (b.seconds - a.seconds) / (large - small)
        startup = a.seconds - per_mb * small
        print(
            f"{stage:>9}: time ratio {b.seconds / a.seconds:5.2f}x for {large / small:.0f}x the"
            f" data; fit {startup:.1f} s start-up + {per_mb:.3f} s/MB ({1 / per_mb:.2f} MB/s);"
            f" {b.cpu_seconds / large:.3f} CPU s/MB"
        )
        if "baseline" not in measured:
            continue
        for mb in (small, large):
            new, old = measured["lmpipe"][mb][stage], measured["baseline"][mb][stage]
            print(
                f"{'':>9}  {mb} MB: time {new.seconds:.1f} s vs baseline {old.seconds:.1f} s ="
                f" {new.seconds / old.seconds:.2f}x (target <= {TIME_RATIO_LIMIT});"
                f" peak RSS {new.peak_rss_gb:.2f} GB vs {old.peak_rss_gb:.2f} GB ="
                f" {new.peak_rss_gb / old.peak_rss_gb:.2f}x; CPU {new.cpu_seconds:.0f} s vs"
                f" {old.cpu_seconds:.0f} s"
            )
    clean = measured["lmpipe"][large]["clean"]
    verdict = "met" if clean.peak_rss_gb <= RSS_LIMIT_GB else "MISSED"
    print(f"clean peak RSS at {large} MB: {clean.peak_rss_gb:.2f} GB (target <= {RSS_LIMIT_GB} GB:"
          f" {verdict}); peak PSS {clean.peak_pss_gb:.2f} GB")  # fmt: skip
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
