"""lm-evaluation-harness as an evaluator (lmpipe.evaluation.harness), offline, and our own
WikiText-2 metric on the harness's definition: the same detokenizer, the same rolling
windows, and the same bits per byte as the harness on the same model."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from lmpipe.evaluation.harness import OFFLINE_TASKS, TASKS_DIR, check_tasks, run_harness
from lmpipe.evaluation.held_out_lm import article_scores, context_length, rolling_windows
from lmpipe.runs.config import ConfigError
from lmpipe.taskdata import wikitext

lm_eval = pytest.importorskip("lm_eval", reason="the optional extra `harness` (lm-eval)")
from lm_eval import utils as harness_utils  # noqa: E402

ARTICLES = 3


def harness_detokenizer():
    path = Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "preprocess_wikitext.py"
    spec = importlib.util.spec_from_file_location("harness_wikitext", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.wikitext_detokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A tiny Llama with a 64-token context, so an article spans many windows."""
    from lmpipe.runs.config import ModelConfig
    from lmpipe.training.loop import seed_everything
    from lmpipe.training.model import build_model, save_model

    seed_everything(0)
    cfg = ModelConfig(preset="test", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                      intermediate_size=64, max_seq_len=64)  # fmt: skip
    path = tmp_path_factory.mktemp("harness") / "model"
    save_model(build_model(cfg, tiny_tokenizer), tiny_tokenizer, path)
    return path


def test_the_detokenizer_is_the_harnesses_on_every_test_article() -> None:
    theirs = harness_detokenizer()
    pages = wikitext.articles("test")
    assert len(pages) == 62  # the harness's wikitext test split has 62 documents
    assert all(wikitext.detokenize(page) == theirs({"page": page}) for page in pages)


@pytest.mark.parametrize("max_length", [1, 4, 64])
def test_rolling_windows_are_the_harnesses(max_length: int) -> None:
    draw = random.Random(max_length)
    for length in [0, 1, max_length - 1, max_length, max_length + 1, 3 * max_length + 2,
                   draw.randrange(1, 500)]:  # fmt: skip
        tokens = [draw.randrange(100) for _ in range(max(length, 0))]
        theirs = [harness_utils.make_disjoint_window(window) for window in
                  harness_utils.get_rolling_token_windows(tokens, 7, max_length, 1)]  # fmt: skip
        assert rolling_windows(tokens, 7, max_length) == theirs, (max_length, length)


def test_our_wikitext_bits_per_byte_equal_the_harnesses_on_the_same_model(
    model_dir: Path, tiny_tokenizer
) -> None:
    from lmpipe.training.model import load_model

    model = load_model(model_dir).eval()
    ours = article_scores(model, tiny_tokenizer, wikitext.articles("test")[:ARTICLES],
                          context_length(model), 8, torch.device("cpu"))  # fmt: skip
    metrics, _ = run_harness({"tiny": model_dir}, ["lmpipe_wikitext2"], {}, limit=ARTICLES)
    assert abs(ours.bits_per_byte - metrics["tiny_harness_lmpipe_wikitext2_bits_per_byte"]) < 1e-3
    assert ours.word_perplexity == pytest.approx(
        metrics["tiny_harness_lmpipe_wikitext2_word_perplexity"], rel=1e-3
    )
    assert 3 < ours.bits_per_byte < 20  # a random model's, far from a trained one's ~1


def test_reasoning_gym_and_trec_run_offline_with_their_stderr(model_dir: Path) -> None:
    finetune = {"dataset": "reasoning_gym",
                "reasoning_gym": {"test_size": 6, "train_size": 6, "val_size": 6}}  # fmt: skip
    metrics, _ = run_harness({"tiny": model_dir}, ["lmpipe_reasoning_gym", "lmpipe_trec"],
                             finetune, limit=6, max_new_tokens=4)  # fmt: skip
    assert 0 <= metrics["tiny_harness_lmpipe_reasoning_gym_exact_match"] <= 1
    assert 0 <= metrics["tiny_harness_lmpipe_trec_acc"] <= 1
    assert "tiny_harness_lmpipe_trec_acc_stderr" in metrics
    assert "tiny_harness_lmpipe_reasoning_gym_exact_match_stderr" in metrics


def test_a_task_that_needs_the_hub_or_does_not_exist_is_refused_by_name() -> None:
    from lm_eval.tasks import TaskManager

    check_tasks(list(OFFLINE_TASKS), allow_hub=False)
    every_task = TaskManager(include_path=str(TASKS_DIR))  # one ~10 s scan for both checks
    with pytest.raises(ConfigError, match=r"'hellaswag' downloads its data.*network"):
        check_tasks(["lmpipe_trec", "hellaswag"], allow_hub=False, manager=every_task)
    check_tasks(["hellaswag"], allow_hub=True, manager=every_task)
    with pytest.raises(ConfigError, match=r"unknown harness task 'no_such_task'"):
        check_tasks(["no_such_task"], allow_hub=True, manager=every_task)


def test_the_finetune_config_the_reasoning_gym_task_reads_is_the_schemas() -> None:
    from lmpipe.evaluation.harness_tasks.lmpipe_tasks import reasoning_gym_test

    with pytest.raises(ValueError, match="lmpipe_finetune"):
        reasoning_gym_test()
    test = reasoning_gym_test(lmpipe_finetune={"dataset": "reasoning_gym", "reasoning_gym": {
        "test_size": 4, "train_size": 4, "val_size": 4}})["test"]  # fmt: skip
    assert len(test) == 4 and all(row["answer"] for row in test)
