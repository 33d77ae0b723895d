"""`lmpipe serve`: a registered model behind the OpenAI API in a real server process,
driven by the official `openai` client; a classifier behind /v1/classify; and the ways a
request or the command can be wrong, each a clear error rather than a crash."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import openai
import pytest

from lmpipe.deploy.release import deploy
from lmpipe.feedback.rollouts import prompt_ids
from lmpipe.runs.config import DeployConfig, GateConfig, QuantizeConfig
from lmpipe.tasks.finetuning import finetuning_task
from lmpipe.training.model import load_classifier, load_model, save_model
from tests.servers import free_port, lmpipe_serve

NAME = "served-chat"
QUESTION = [{"role": "user", "content": "What is 3 + 4?"}]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict:
    """A private store with a tiny chat model registered as NAME@champion, and a
    classifier saved as a transformers directory."""
    from lmpipe.runs.config import ModelConfig
    from lmpipe.training.loop import seed_everything
    from lmpipe.training.model import build_model

    root = tmp_path_factory.mktemp("openai")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    seed_everything(0)
    cfg = ModelConfig(preset="test", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                      intermediate_size=64, max_seq_len=64)  # fmt: skip
    model = build_model(cfg, tiny_tokenizer)
    save_model(model, tiny_tokenizer, root / "model")
    classifier = load_classifier(root / "model", ["noun.animal", "noun.food"])
    save_model(classifier, tiny_tokenizer, root / "classifier")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        deploy_cfg = DeployConfig(
            registered_model_name=NAME, gates={"sft": GateConfig("score", "max", 0.0)},
            quantize=QuantizeConfig(variants=[]), max_new_tokens=4)  # fmt: skip
        with mlflow.start_run():
            deploy(root / "model", finetuning_task("sft"), {"score": 1.0}, deploy_cfg, {}, [])
    return {"root": root, "uri": uri, "env": {"MLFLOW_TRACKING_URI": uri}}


@pytest.fixture(scope="module")
def server(store: dict) -> str:
    with lmpipe_serve(f"models:/{NAME}@champion", store["root"] / "serve.log",
                      store["env"]) as url:  # fmt: skip
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def greedy(store: dict, tiny_tokenizer) -> list[int]:
    """The model's own greedy reply to QUESTION, in-process (transformers' generate)."""
    model = load_model(store["root"] / "model").eval()
    import torch

    ids = torch.tensor([prompt_ids(tiny_tokenizer, QUESTION)])
    out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False,
                         pad_token_id=tiny_tokenizer.pad_token_id)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]


def test_a_greedy_reply_is_the_models_own_and_usage_counts_its_tokens(
    client: openai.OpenAI, greedy: list[int], tiny_tokenizer
) -> None:
    reply = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=8,
                                           temperature=0)  # fmt: skip
    expected = tiny_tokenizer.decode(greedy, skip_special_tokens=True)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(prompt_ids(tiny_tokenizer, QUESTION))
    assert reply.usage.completion_tokens == len(greedy) == 8  # random weights never stop
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8


def test_streaming_sends_the_same_reply_in_pieces_then_usage(
    client: openai.OpenAI, greedy: list[int], tiny_tokenizer
) -> None:
    chunks = list(client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=8,
                                                 temperature=0, stream=True))  # fmt: skip
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == tiny_tokenizer.decode(greedy, skip_special_tokens=True)
    assert chunks[-1].usage.completion_tokens == 8


def test_stop_ends_the_reply_before_the_stop_sequence(
    client: openai.OpenAI, greedy: list[int], tiny_tokenizer
) -> None:
    full = tiny_tokenizer.decode(greedy, skip_special_tokens=True)
    cut = len(full) // 2
    stop = full[cut : cut + 3]
    reply = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=8,
                                           temperature=0, stop=[stop])  # fmt: skip
    assert reply.choices[0].message.content == full[: full.index(stop)]
    assert reply.usage.completion_tokens < 8  # generation stopped there, not at max_tokens


def test_n_choices_with_a_seed_differ_from_each_other_and_repeat(client: openai.OpenAI) -> None:
    def ask(seed: int) -> list[str]:
        reply = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=8,
                                               temperature=1.0, n=3, seed=seed)  # fmt: skip
        return [choice.message.content for choice in reply.choices]

    first = ask(7)
    assert len(first) == 3 and len(set(first)) == 3
    assert ask(7) == first
    assert ask(8) != first


def test_eight_concurrent_clients_all_get_answers(server: str) -> None:
    def ask(index: int) -> str:
        local = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
        reply = local.chat.completions.create(
            model=NAME, max_tokens=6, temperature=0,
            messages=[{"role": "user", "content": f"What is {index} + 1?"}])  # fmt: skip
        return reply.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    assert len(replies) == 8 and all(isinstance(r, str) for r in replies)


@pytest.mark.parametrize(
    ("request_change", "error", "code"),
    [
        ({"model": "gpt-4o"}, openai.NotFoundError, "model_not_found"),
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            openai.BadRequestError,
            "invalid_role",
        ),
        ({"max_tokens": 10_000}, openai.BadRequestError, "context_length_exceeded"),
        (
            {"messages": [{"role": "user", "content": "word " * 80}]},
            openai.BadRequestError,
            "context_length_exceeded",
        ),
        ({"temperature": 5.0}, openai.BadRequestError, "invalid_value"),
    ],
)
def test_a_bad_request_gets_an_openai_error_object_and_the_server_stays_up(
    client: openai.OpenAI, request_change: dict, error: type, code: str
) -> None:
    request = {"model": NAME, "messages": QUESTION, "max_tokens": 4} | request_change
    with pytest.raises(error) as raised:
        client.chat.completions.create(**request)
    assert raised.value.body["code"] == code and raised.value.body["message"]
    assert client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=2)


def test_a_classifier_directory_answers_labels_on_v1_classify(store: dict) -> None:
    """The classifier's API class as LitServe calls it (decode, predict, encode); the
    server around it is the one the chat tests drive."""
    from fastapi import HTTPException

    from lmpipe.deploy.openai_server import ClassifyAPI, resolve_source

    source = resolve_source(str(store["root"] / "classifier"))
    assert not source.mlflow_model and source.name == "classifier"
    api = ClassifyAPI(source)
    api.setup("cpu")
    texts = api.decode_request({"input": ["a small dog", "an apple pie"]})
    body = api.encode_response(api.predict(texts))
    assert body["model"] == "classifier" and [row["index"] for row in body["data"]] == [0, 1]
    assert {row["label"] for row in body["data"]} <= {"noun.animal", "noun.food"}
    assert all(0 < row["confidence"] <= 1 for row in body["data"])
    assert api.decode_request({"input": "one text"}) == ["one text"]
    for bad in ({"text": "no input key"}, {"input": []}, {"input": [1, 2]}):
        with pytest.raises(HTTPException) as refused:
            api.decode_request(bad)
        assert refused.value.status_code == 400


def test_building_the_server_leaves_the_models_logged_code_off_sys_path(
    store: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading the pyfunc puts its logged copy of lmpipe first on sys.path; LitServe's
    spawned workers would import that copy (an older one lacks lmpipe.cli: the worker dies)."""
    import sys

    from lmpipe.deploy.openai_server import build_server, model_directory, resolve_source

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    mlflow.set_tracking_uri(store["uri"])
    source = resolve_source(f"models:/{NAME}@champion")
    directory, task = model_directory(source)
    assert task == "sft" and (directory / "config.json").is_file()
    before = list(sys.path)
    build_server(source)
    assert sys.path == before


def lmpipe(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    program = str(Path(sys.executable).parent / "lmpipe")
    return subprocess.run([program, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_an_unknown_model_uri_fails_with_a_message_and_exit_1(store: dict) -> None:
    done = lmpipe("serve", "models:/no-such-model@champion", env=store["env"])
    assert done.returncode == 1 and "no such model" in done.stderr
    done = lmpipe("serve", "hf://not-a-uri")
    assert done.returncode == 1 and "not a model URI" in done.stderr


def test_a_port_in_use_fails_with_a_message_and_exit_1(store: dict) -> None:
    import socket

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = lmpipe("serve", str(store["root"] / "model"), "--port", str(port))
    assert done.returncode == 1 and f"127.0.0.1:{port} is in use" in done.stderr
