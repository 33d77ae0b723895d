"""A registered model behind `mlflow models serve` or `lmpipe serve`, and timed HTTP
requests against it.

MLflow's scoring server and our OpenAI-compatible server (LitServe) are the serving engines;
this module starts one on 127.0.0.1 with the current environment (`--env-manager local`: no
virtualenv is built), waits until it answers, and measures request latency. Used by the
serving and pipeline tests and by benchmarks/serving_latency.py; it is no part of the
library.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Response:
    status: int
    body: Any


def post(url: str, payload: bytes | dict, content_type: str = "application/json") -> Response:
    """POST and return (status, parsed JSON or raw text); HTTP errors are returned, not raised."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            status, text = reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return Response(status, json.loads(text))
    except json.JSONDecodeError:
        return Response(status, text)


def is_up(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=5) as reply:
            return reply.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def mlflow_process(
    args: list[str], port: int, log_path: Path, env: dict[str, str] | None = None,
    startup_timeout: float = 180.0,
) -> contextlib.AbstractContextManager[str]:  # fmt: skip
    """`mlflow <args>` serving HTTP on 127.0.0.1:`port` until the block ends; yields its URL."""
    return http_process("mlflow", args, port, log_path, env, startup_timeout)


def lmpipe_serve(
    source: str, log_path: Path, env: dict[str, str] | None = None, port: int | None = None
) -> contextlib.AbstractContextManager[str]:
    """`lmpipe serve <source>` (the OpenAI-compatible server) on 127.0.0.1; yields its URL."""
    port = port or free_port()
    return http_process("lmpipe", ["serve", source, "--port", str(port)], port, log_path, env)


@contextlib.contextmanager
def http_process(
    program: str, args: list[str], port: int, log_path: Path,
    env: dict[str, str] | None = None, startup_timeout: float = 180.0,
) -> Iterator[str]:  # fmt: skip
    """The venv's `program <args>` serving HTTP on 127.0.0.1:`port` until the block ends;
    yields its URL once /health answers.

    It runs in its own process group, so stopping it also stops the workers it forked.
    """
    bin_dir = str(Path(sys.executable).parent)
    # The project's venv first: mlflow launches uvicorn/gunicorn through the shell.
    env = {**os.environ, **(env or {}),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([str(Path(bin_dir) / program), *args], env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + startup_timeout
            while not is_up(base_url):
                if process.poll() is not None:
                    raise RuntimeError(f"{program} {args[0]} exited {process.returncode}: "
                                       f"{log_path.read_text()[-3000:]}")  # fmt: skip
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{program} {args[0]} not up after {startup_timeout}s")
                time.sleep(0.5)
            yield base_url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()


def serve(
    model_uri: str, tracking_uri: str, log_path: Path, port: int | None = None
) -> contextlib.AbstractContextManager[str]:
    """`mlflow models serve` for `model_uri` on 127.0.0.1; yields the base URL."""
    port = port or free_port()
    args = ["models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    return mlflow_process(args, port, log_path, {"MLFLOW_TRACKING_URI": tracking_uri})


def tracking_server(
    backend_store_uri: str,
    artifacts_dir: Path,
    log_path: Path,
    port: int | None = None,
    command: str = "server",
) -> contextlib.AbstractContextManager[str]:
    """`mlflow server` (or `mlflow ui`, the same server) on 127.0.0.1, default host checks."""
    port = port or free_port()
    args = [command, "--backend-store-uri", backend_store_uri,
            "--artifacts-destination", str(artifacts_dir),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    return mlflow_process(args, port, log_path)


@dataclass
class LatencyReport:
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    mean_ms: float


def sequential_latency(base_url: str, payload: dict, requests: int) -> LatencyReport:
    """`requests` requests one after another; an error is any non-200 answer."""
    seconds, errors = [], 0
    for _ in range(requests):
        start = time.perf_counter()
        response = post(f"{base_url}/invocations", payload)
        seconds.append(time.perf_counter() - start)
        errors += response.status != 200
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return LatencyReport(requests, errors, cuts[49] * 1e3, cuts[94] * 1e3,
                         statistics.fmean(seconds) * 1e3)  # fmt: skip
