"""A real llama.cpp for our GGUF files: node-llama-cpp's prebuilt CPU binary, pinned in
`tools/llamacpp/package-lock.json` and installed from npm on first use (`npm ci`), driven
through `tools/llamacpp/generate.mjs`. The tests and the GGUF benchmark load exports with
it, as users' runtimes do, rather than with transformers' GGUF reader alone."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# tools/llamacpp of this checkout (src/lmpipe/deploy/ is three levels below it).
DEFAULT_RUNNER = Path(__file__).resolve().parents[3] / "tools" / "llamacpp"
RUNNER_DIR = Path(os.environ.get("LMPIPE_LLAMACPP_DIR", DEFAULT_RUNNER))
Messages = Sequence[Mapping[str, str]]


class LlamaCppUnavailable(RuntimeError):
    """No llama.cpp runtime here (no Node or npm, or the install failed); says which."""


@dataclass(frozen=True)
class LlamaCppReply:
    prompt_text: str  # the prompt as the file's chat template rendered it
    prompt_tokens: tuple[int, ...]
    reply_tokens: tuple[int, ...]  # the reply's tokens, without the end-of-turn token
    reply: str


def ensure_runtime(runner_dir: Path = RUNNER_DIR) -> Path:
    """The runner directory with node-llama-cpp installed (`npm ci` from the lock file on
    first use, its prebuilt linux-x64 binary only); LlamaCppUnavailable where it cannot be."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise LlamaCppUnavailable("llama.cpp runs through node-llama-cpp: install Node.js >= 20")
    if not (runner_dir / "node_modules" / "node-llama-cpp").is_dir():
        log.info("llama.cpp: npm ci in %s (node-llama-cpp, prebuilt CPU binary)", runner_dir)
        # --omit=optional: the CUDA, Vulkan and other platforms' binaries (650 MB); the
        # linux-x64 one is a direct dependency in package.json.
        done = subprocess.run([npm, "ci", "--omit=optional", "--no-audit", "--no-fund"],
                              cwd=runner_dir, capture_output=True, text=True)  # fmt: skip
        if done.returncode:
            raise LlamaCppUnavailable(f"npm ci in {runner_dir} failed: {done.stderr[-2000:]}")
    return runner_dir


def greedy_replies(
    gguf: Path,
    conversations: Sequence[Messages],
    max_tokens: int,
    threads: int | None = None,
    timeout: float = 600,
) -> tuple[dict, list[LlamaCppReply]]:
    """llama.cpp's greedy reply to each conversation, rendered by the file's own chat
    template; with the tokenizer metadata llama.cpp read (`pre`, `eog`)."""
    runner = ensure_runtime()
    request = {"model": str(Path(gguf).resolve()), "max_tokens": max_tokens, "threads": threads,
               "conversations": [[dict(m) for m in c] for c in conversations]}  # fmt: skip
    done = subprocess.run(["node", "generate.mjs"], cwd=runner, input=json.dumps(request),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"llama.cpp could not run {gguf}: {done.stderr[-3000:]}")
    out = json.loads(done.stdout)
    replies = [
        LlamaCppReply(r["prompt_text"], tuple(r["prompt_tokens"]), tuple(r["reply_tokens"]),
                      r["reply"])
        for r in out.pop("results")
    ]  # fmt: skip
    return out, replies
