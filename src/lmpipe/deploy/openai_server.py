"""`lmpipe serve`: a registered model behind the OpenAI API, on LitServe's OpenAI spec.

LitServe (Lightning AI's serving library) owns the protocol: request parsing, the
`/v1/chat/completions` route, server-sent events for `stream: true`, fanning `n` out into
n requests and adding up `usage`, and its inference worker processes. Ours is what the
model does with a request, the checks that turn bad requests into OpenAI error objects
(a 4xx, never a crash), `seed`, `stop` and `GET /v1/models`.

Why LitServe: MLflow's scoring server has `/invocations` only (no OpenAI route, no
streaming), and `transformers serve` loads models by hub id, refuses `n` and answers
errors in FastAPI's own shape. LitServe is a library for exactly this: an API class per
model and a spec per protocol.

What is served: an MLflow model (`models:/<name>@<alias>`, `models:/<name>/<version>`,
`runs:/<run id>/<path>`, a run id, or a local MLflow model directory) is loaded as the
deploy stage logged it (lmpipe.deploy.serving, quantized variants rebuilt), a transformers
directory as saved. A causal LM answers chat completions; a classifier answers
`POST /v1/classify` ({"input": text or [texts]} -> a label and its probability per text).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from fastapi import BackgroundTasks, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from litserve.specs.openai import ChatCompletionRequest, OpenAISpec
from litserve.utils import ResponseBufferItem
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TOKENS = 256  # a reply's length when the request names none
MAX_STOP_SEQUENCES = 4  # as OpenAI allows
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ServeError(ValueError):
    """A model source `lmpipe serve` cannot serve, or a port it cannot take; says which."""


@dataclass(frozen=True)
class ServedSource:
    """What `lmpipe serve` loads: a local directory (an MLflow model, or a transformers
    model) and the name clients address it by."""

    name: str
    path: Path
    mlflow_model: bool


def resolve_source(source: str) -> ServedSource:
    """The local model behind `source` (MLflow URIs are downloaded from the project's
    tracking store); ServeError when there is none."""
    import mlflow

    from lmpipe.runs import tracking

    path = Path(source)
    if path.is_dir():
        if (path / "MLmodel").is_file():
            return ServedSource(path.resolve().name, path.resolve(), True)
        if (path / "config.json").is_file():
            return ServedSource(path.resolve().name, path.resolve(), False)
        raise ServeError(f"{source}: a directory with neither an MLmodel file (an MLflow "
                         "model) nor config.json (a transformers model)")  # fmt: skip
    if RUN_ID.match(source):
        uri, name = f"runs:/{source}/model", f"run-{source[:8]}"
    elif source.startswith("models:/"):
        uri, name = source, re.split(r"[@/]", source[len("models:/") :])[0]
    elif source.startswith("runs:/"):
        uri, name = source, f"run-{source[len('runs:/') :][:8]}"
    else:
        raise ServeError(f"{source}: not a model URI (models:/<name>@<alias>, "
                         "models:/<name>/<version>, runs:/<run id>/<path>), a run id or a "
                         "model directory")  # fmt: skip
    tracking.configure()
    try:
        local = mlflow.artifacts.download_artifacts(uri)
    except Exception as err:  # MLflow raises several kinds for a missing model or run
        raise ServeError(f"{source}: no such model in {tracking.tracking_uri()} "
                         f"({type(err).__name__}: {str(err)[:300]})") from err  # fmt: skip
    if not (Path(local) / "MLmodel").is_file():
        raise ServeError(f"{source}: {uri} is not an MLflow model (no MLmodel file)")
    return ServedSource(name, Path(local), True)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    task: Any  # lmpipe.tasks.base.FinetuningTask


def load_served(source: ServedSource) -> LoadedModel:
    """The model, tokenizer and task of `source`, as the deployed pyfunc loads them."""
    if source.mlflow_model:
        import mlflow

        served = mlflow.pyfunc.load_model(str(source.path)).unwrap_python_model()
        return LoadedModel(served.model, served.tokenizer, served.task)
    from transformers import AutoConfig

    from lmpipe.data.tokenizer import load_tokenizer
    from lmpipe.tasks.finetuning import finetuning_task

    architectures = AutoConfig.from_pretrained(source.path).architectures or []
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    task = finetuning_task("classify" if classifier else "sft")
    return LoadedModel(task.load(source.path).eval(), load_tokenizer(source.path), task)


def openai_error(status: int, message: str, kind: str, code: str | None,
                 param: str | None = None) -> JSONResponse:  # fmt: skip
    """An OpenAI error object: the body the `openai` client reads into its exceptions."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class RequestRefused(HTTPException):
    """A request the model cannot answer, with the OpenAI error fields to say why."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(status, message)
        self.code, self.param = code, param


class ChatRequest(ChatCompletionRequest):
    """LitServe's request with the OpenAI fields it leaves out."""

    seed: int | None = None
    # Which of the request's n choices this copy computes (set by ChatSpec): with a seed,
    # choice i samples from seed + i, so the n choices differ and each is reproducible.
    choice: int = 0


def message_text(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a list (None: other parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [getattr(part, "text", None) for part in content]
        if all(isinstance(part, str) for part in parts):
            return "".join(parts)
    return None


def chat_messages(request: ChatRequest) -> list[dict[str, str]]:
    """The request's messages as the chat template takes them; RequestRefused (400) for a
    role or a content the model has no use for."""
    messages = []
    for index, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise RequestRefused(400, f"messages[{index}].role is {message.role!r}: this "
                                 f"model takes {', '.join(ROLES)}", "invalid_role",
                                 f"messages[{index}].role")  # fmt: skip
        text = message_text(message.content)
        if text is None:
            raise RequestRefused(400, f"messages[{index}].content: this model reads text only",
                                 "invalid_content", f"messages[{index}].content")  # fmt: skip
        messages.append({"role": message.role, "content": text})
    if not messages:
        raise RequestRefused(400, "messages is empty", "invalid_messages", "messages")
    return messages


def stop_sequences(request: ChatRequest) -> list[str]:
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
        raise RequestRefused(400, f"stop takes up to {MAX_STOP_SEQUENCES} non-empty strings",
                             "invalid_stop", "stop")  # fmt: skip
    return stop


@dataclass(frozen=True)
class Budget:
    prompt_tokens: int
    max_tokens: int


def token_budget(request: ChatRequest, tokenizer: Any, context_length: int) -> Budget:
    """The prompt's length and the reply's limit; RequestRefused (400) past the context."""
    from lmpipe.feedback.rollouts import prompt_ids

    prompt = len(prompt_ids(tokenizer, chat_messages(request)))
    asked = request.max_completion_tokens or request.max_tokens
    if asked is not None and asked < 1:
        raise RequestRefused(400, f"max_tokens must be >= 1, got {asked}", "invalid_value",
                             "max_tokens")  # fmt: skip
    limit = asked or min(DEFAULT_MAX_TOKENS, context_length - prompt)
    if prompt + max(limit, 1) > context_length:
        raise RequestRefused(400, f"This model's maximum context length is {context_length} "
                             f"tokens; the messages take {prompt} and max_tokens asks for "
                             f"{asked or 1} more", "context_length_exceeded",
                             "messages")  # fmt: skip
    return Budget(prompt, limit)


class ChatSpec(OpenAISpec):
    """LitServe's OpenAI spec, checking each request before its n choices go out."""

    def __init__(self, model_name: str, tokenizer: Any, context_length: int) -> None:
        super().__init__()
        self.model_name, self.tokenizer, self.context_length = model_name, tokenizer, context_length

    def pre_setup(self, lit_api: ls.LitAPI) -> None:
        super().pre_setup(lit_api)
        self.add_endpoint("/v1/models", self.list_models, ["GET"])

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "created": 0, "owned_by": "lmpipe"}]}  # fmt: skip

    def check(self, request: ChatRequest) -> None:
        if request.model and request.model != self.model_name:
            raise RequestRefused(404, f"The model {request.model!r} does not exist: this "
                                 f"server serves {self.model_name!r}", "model_not_found",
                                 "model")  # fmt: skip
        if not 1 <= (request.n or 1) <= 16:
            raise RequestRefused(
                400, f"n must be in [1, 16], got {request.n}", "invalid_value", "n"
            )
        if not 0 <= (request.temperature or 0) <= 2:
            raise RequestRefused(400, f"temperature must be in [0, 2], got "
                                 f"{request.temperature}", "invalid_value",
                                 "temperature")  # fmt: skip
        if not 0 < (request.top_p if request.top_p is not None else 1) <= 1:
            raise RequestRefused(400, f"top_p must be in (0, 1], got {request.top_p}",
                                 "invalid_value", "top_p")  # fmt: skip
        stop_sequences(request)
        token_budget(request, self.tokenizer, self.context_length)

    async def chat_completion(self, request: ChatRequest, background_tasks: BackgroundTasks):
        self.check(request)
        # LitServe 0.2.19's fan-out of n choices, each copy told its index (for `seed`).
        response_queue_id = self.response_queue_id
        uids = [uuid.uuid4() for _ in range(request.n or 1)]
        self.queues, self.events = [], []
        for index, uid in enumerate(uids):
            copy = request.model_copy(update={"n": 1, "choice": index})
            queue, event = deque(), asyncio.Event()
            self.response_buffer[uid] = ResponseBufferItem(response_queue=queue, event=event)
            self.request_queue.put((response_queue_id, uid, time.monotonic(), copy))
            self.queues.append(queue)
            self.events.append(event)
        responses = await self.get_from_queues(uids)
        if request.stream:
            from fastapi.responses import StreamingResponse

            return StreamingResponse(self.streaming_completion(request, responses),
                                     media_type="text/event-stream",
                                     background=background_tasks)  # fmt: skip
        return await self.non_streaming_completion(request, responses)


class StopAtStrings(StoppingCriteria):
    """Ends generation once `stopped` is set (a stop sequence appeared in the text)."""

    def __init__(self) -> None:
        self.stopped = threading.Event()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> bool:
        return self.stopped.is_set()


class CountingStreamer(TextIteratorStreamer):
    """TextIteratorStreamer that also counts the reply's tokens (for `usage`)."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        self.generated = 0

    def put(self, value: torch.Tensor) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.generated += value.numel()
        super().put(value)


def trimmed_at_stops(pieces: Iterator[str], stops: Sequence[str]) -> Iterator[str]:
    """`pieces` up to (not including) the first stop sequence, holding back a tail that
    could start one."""
    hold = max((len(s) for s in stops), default=1) - 1
    pending = ""
    for piece in pieces:
        pending += piece
        found = [i for i in (pending.find(s) for s in stops) if i >= 0]
        if found:
            if min(found):
                yield pending[: min(found)]
            return
        if len(pending) > hold:
            yield pending[: len(pending) - hold]
            pending = pending[len(pending) - hold :]
    if pending:
        yield pending


class ChatAPI(ls.LitAPI):
    """A causal LM's chat completions, one request at a time in each inference worker."""

    def __init__(self, source: ServedSource, tokenizer: Any, context_length: int) -> None:
        super().__init__(spec=ChatSpec(source.name, tokenizer, context_length))
        self.source, self.context_length = source, context_length

    def setup(self, device: str) -> None:
        loaded = load_served(self.source)
        self.model = loaded.model.to(device).eval()
        self.tokenizer = loaded.tokenizer

    def predict(self, request: ChatRequest) -> Iterator[dict[str, Any]]:
        from lmpipe.feedback.rollouts import Sampling, prompt_ids

        messages = chat_messages(request)
        budget = token_budget(request, self.tokenizer, self.context_length)
        ids = torch.tensor([prompt_ids(self.tokenizer, messages)], device=self.model.device)
        sampling = Sampling(budget.max_tokens, float(request.temperature or 0),
                            float(request.top_p if request.top_p is not None else 1))  # fmt: skip
        streamer, stop = CountingStreamer(self.tokenizer), StopAtStrings()
        kwargs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "streamer": streamer,
            "max_new_tokens": budget.max_tokens,
            "stopping_criteria": StoppingCriteriaList([stop]),
            "pad_token_id": self.tokenizer.pad_token_id,
            **sampling.generate_kwargs(),
        }
        if request.seed is not None:
            # transformers' sampling draws from torch's global stream: seeded here, in this
            # worker, which runs one request at a time.
            torch.manual_seed(request.seed + request.choice)
        worker = threading.Thread(target=self.model.generate, kwargs=kwargs, daemon=True)
        worker.start()
        try:
            for piece in trimmed_at_stops(streamer, stop_sequences(request)):
                if piece:
                    yield {"role": "assistant", "content": piece}
        finally:
            stop.stopped.set()  # a stop sequence (or a gone client) ends generation here
            worker.join()
        yield {"role": "assistant", "content": "", "prompt_tokens": budget.prompt_tokens,
               "completion_tokens": streamer.generated,
               "total_tokens": budget.prompt_tokens + streamer.generated}  # fmt: skip


class ClassifyAPI(ls.LitAPI):
    """A classifier: `POST /v1/classify` with {"input": text or [texts]} answers, per text,
    its most probable label and that label's probability."""

    def __init__(self, source: ServedSource) -> None:
        super().__init__(api_path="/v1/classify")
        self.source = source

    def setup(self, device: str) -> None:
        loaded = load_served(self.source)
        self.model, self.tokenizer, self.task = (
            loaded.model.to(device).eval(),
            loaded.tokenizer,
            loaded.task,
        )

    def decode_request(self, request: dict) -> list[str]:
        texts = request.get("input") if isinstance(request, dict) else None
        texts = [texts] if isinstance(texts, str) else texts
        if not texts or not all(isinstance(t, str) for t in texts):
            raise HTTPException(400, 'the body is {"input": a text or a list of texts}')
        return texts

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        frame = self.task.serve(self.model, self.tokenizer, texts, {})
        return [{"index": i, "label": row.label, "confidence": float(row.confidence)}
                for i, row in enumerate(frame.itertuples())]  # fmt: skip

    def encode_response(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"object": "list", "model": self.source.name, "data": rows}


def _error_handlers(app: Any) -> None:
    """Errors as OpenAI error objects with their 4xx status (LitServe leaves FastAPI's)."""

    async def refused(_request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, RequestRefused):
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            return openai_error(exc.status_code, exc.detail, kind, exc.code, exc.param)
        status = getattr(exc, "status_code", 500)
        kind = "invalid_request_error" if status < 500 else "server_error"
        return openai_error(status, str(getattr(exc, "detail", exc)), kind, None)

    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return openai_error(400, f"{where}: {first.get('msg', 'invalid request')}",
                            "invalid_request_error", "invalid_request", where)  # fmt: skip

    app.add_exception_handler(HTTPException, refused)
    app.add_exception_handler(RequestValidationError, invalid)


def check_port(host: str, port: int) -> None:
    """ServeError now, rather than a server that dies after loading, if the port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ServeError(f"{host}:{port} is in use ({err.strerror}): pick another "
                             "with --port") from err  # fmt: skip


def model_directory(source: ServedSource) -> tuple[Path, str | None]:
    """The transformers directory inside `source` and the task its MLflow model was logged
    for (None: a plain directory), read without loading the pyfunc: loading it puts the
    model's logged copy of lmpipe first on sys.path, which the inference workers LitServe
    spawns would then import in place of the installed one."""
    if not source.mlflow_model:
        return source.path, None
    from mlflow.models import Model

    flavor = Model.load(str(source.path / "MLmodel")).flavors["python_function"]
    task = (flavor.get("config") or {}).get("task", "sft")  # the logged model_config
    return source.path / flavor["artifacts"]["model"]["path"], task


def build_server(source: ServedSource, timeout: float = 600) -> ls.LitServer:
    """The LitServer for `source`: chat completions for a causal LM, /v1/classify for a
    classifier."""
    from transformers import AutoConfig

    from lmpipe.data.tokenizer import load_tokenizer
    from lmpipe.tasks.finetuning import finetuning_task

    directory, task = model_directory(source)
    config = AutoConfig.from_pretrained(directory)
    if task is None:
        classifier = any(a.endswith("ForSequenceClassification")
                         for a in config.architectures or [])  # fmt: skip
        task = "classify" if classifier else "sft"
    if finetuning_task(task).serving.generates:
        context_length = int(getattr(config, "max_position_embeddings", 2048))
        api = ChatAPI(source, load_tokenizer(directory), context_length)
    else:
        api = ClassifyAPI(source)
    server = ls.LitServer(api, accelerator="auto", workers_per_device=1, timeout=timeout)
    _error_handlers(server.app)
    return server


def serve(source: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Resolve `source`, check the port, and serve until interrupted."""
    resolved = resolve_source(source)
    check_port(host, port)
    server = build_server(resolved)
    log.info("serving %s (%s) on http://%s:%d/v1", resolved.name, resolved.path, host, port)
    server.run(host=host, port=port, generate_client_file=False, num_api_servers=1)
