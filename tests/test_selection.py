"""Fine-tuning data selection (lmpipe.selection): IFD, k-center greedy, budgets, dedup and
quality rules of examples, determinism, the score cache, and the config's failure paths."""

from __future__ import annotations

import hashlib
import itertools
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lmpipe.data.batches import IGNORE_INDEX
from lmpipe.runs.config import ConfigError, SelectionConfig, validate
from lmpipe.runs.processes import process_env
from lmpipe.selection.candidates import Candidate
from lmpipe.selection.diversity import k_center_greedy
from lmpipe.selection.rules import rule_reason
from lmpipe.selection.run import select_for_task
from lmpipe.selection.scoring import ScoreCache, cached_scores, example_key, score_candidates
from lmpipe.selection.steps import OVER_BUDGET, SELECTED, fill_budget, select_examples
from lmpipe.taskdata import conversations
from lmpipe.tasks.finetuning import checked_task, finetuning_task
from lmpipe.tasks.sft import selection_candidate


def selection_cfg(**overrides):
    cfg = OmegaConf.structured(SelectionConfig)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def chat(id_: str, *turns: str) -> conversations.Conversation:
    roles = itertools.cycle(["user", "assistant"])
    return conversations.Conversation(
        id_, [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]
    )


def candidate(id_: str, prompt: str, response: str, tokens: int = 10) -> Candidate:
    example = {"input_ids": list(range(tokens)), "labels": list(range(tokens))}
    return Candidate(id_, (prompt, response), ((prompt, response),), example, example)


def given_scores(table: dict[str, tuple[float, float, list[float]]]):
    """A scorer that returns hand-set (conditional loss, response loss, embedding) by id."""

    def score(candidates, losses):
        rows = [table[c.id] for c in candidates]
        embeddings = [np.asarray(r[2], dtype=np.float32) for r in rows]
        return pd.DataFrame({"conditional_loss": [r[0] for r in rows],
                             "response_loss": [r[1] for r in rows],
                             "embedding": embeddings})  # fmt: skip

    return score


# --- IFD -------------------------------------------------------------------------------------


def response_mean_loss(model, ids: list[int], labels: list[int]) -> float:
    """The definition, by hand: mean cross-entropy of each labelled token given the tokens
    before it, one unpadded sequence at a time."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    losses = [
        F.cross_entropy(logits[i - 1], torch.tensor(labels[i])).item()
        for i in range(1, len(ids))
        if labels[i] != IGNORE_INDEX
    ]
    return sum(losses) / len(losses)


def test_ifd_equals_its_definition_in_padded_batches(tiny_model, tiny_tokenizer) -> None:
    conversations = [
        chat("a", "What is AI?", "The study of thinking machines."),
        chat("b", "Hello, how are you today?", "I am fine, thank you."),
        chat("c", "Who spoke?", "The president, to the congress.", "Loudly?", "Yes, loudly."),
    ]
    candidates = [selection_candidate(tiny_tokenizer, c, 192) for c in conversations]
    # The responses alone carry exactly the response tokens the example trains on.
    for c in candidates:
        labelled = [t for t in c.example["labels"] if t != IGNORE_INDEX]
        assert [t for t in c.responses_alone["labels"] if t != IGNORE_INDEX] == labelled
        assert len(c.responses_alone["input_ids"]) < len(c.example["input_ids"])
    scores = score_candidates(tiny_model, candidates, batch_size=3,
                              pad_id=tiny_tokenizer.pad_token_id, device=torch.device("cpu"),
                              losses=True)  # fmt: skip
    for c, (_, row) in zip(candidates, scores.iterrows(), strict=True):
        given = response_mean_loss(tiny_model, c.example["input_ids"], c.example["labels"])
        alone = response_mean_loss(tiny_model, c.responses_alone["input_ids"],
                                   c.responses_alone["labels"])  # fmt: skip
        assert row["conditional_loss"] == pytest.approx(given, rel=1e-5)
        assert row["response_loss"] == pytest.approx(alone, rel=1e-5)
        # The embedding is the mean of the last hidden states over the example's tokens.
        with torch.no_grad():
            hidden = tiny_model.model(input_ids=torch.tensor([c.example["input_ids"]]))
        expected = hidden.last_hidden_state[0].mean(0).numpy()
        np.testing.assert_allclose(row["embedding"], expected, rtol=1e-4, atol=1e-5)


def test_truncated_example_scores_only_the_response_tokens_it_keeps(tiny_tokenizer) -> None:
    long = chat("x", "Why?", "Because " + "the quick brown fox " * 30)
    c = selection_candidate(tiny_tokenizer, long, 40)
    assert len(c.example["input_ids"]) == 40
    kept = [t for t in c.example["labels"] if t != IGNORE_INDEX]
    assert [t for t in c.responses_alone["labels"] if t != IGNORE_INDEX] == kept


def test_ifd_drops_at_or_above_the_maximum_and_ranks_the_rest() -> None:
    candidates = [candidate(str(i), f"prompt {i}", f"reply {i}") for i in range(5)]
    losses = {"0": (0.9, 1.0, [0.0]), "1": (1.0, 1.0, [0.0]), "2": (0.5, 1.0, [0.0]),
              "3": (1.2, 1.0, [0.0]), "4": (0.95, 1.0, [0.0])}  # fmt: skip
    chosen = select_examples(candidates, selection_cfg(steps=["ifd"]), given_scores(losses), 0)
    table = chosen.table.set_index("id")
    assert table.loc[["1", "3"], "reason"].tolist() == ["ifd_at_or_above_max"] * 2
    assert table.loc["0", "ifd"] == pytest.approx(0.9)
    # Ranked by IFD, most difficult first.
    assert table.loc[["4", "0", "2"], "rank"].tolist() == [0, 1, 2]
    budgeted = select_examples(candidates, selection_cfg(steps=["ifd"], **{"budget.count": 2}),
                               given_scores(losses), 0)  # fmt: skip
    assert budgeted.selected_ids == ["0", "4"]  # data order; the easiest one is over budget
    assert budgeted.table.set_index("id").loc["2", "reason"] == OVER_BUDGET


# --- k-center greedy and budgets -------------------------------------------------------------


def test_k_center_greedy_on_points_with_a_known_answer() -> None:
    line = np.array([[0.0], [1.0], [2.0], [10.0], [10.5]])
    chosen, distances = k_center_greedy(line, first=0, max_points=3)
    assert chosen == [0, 4, 2] and distances == [np.inf, 10.5, 2.0]
    # Three far-apart clusters: one center in each, whatever the start.
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    points = np.concatenate([c + rng.normal(size=(20, 2)) for c in centres])
    for first in (0, 25, 59):
        picked, _ = k_center_greedy(points, first=first, max_points=3)
        assert sorted(p // 20 for p in picked) == [0, 1, 2]
    # Greedy is within twice the optimal covering radius (brute force over all 3-subsets).
    small = rng.normal(size=(12, 2))
    picked, _ = k_center_greedy(small, first=0, max_points=3)

    def radius(centers) -> float:
        return float(np.min(np.linalg.norm(small[:, None] - small[list(centers)], axis=2),
                            axis=1).max())  # fmt: skip

    best = min(radius(c) for c in itertools.combinations(range(12), 3))
    assert radius(picked) <= 2 * best + 1e-12


def test_k_center_greedy_respects_a_token_budget() -> None:
    line = np.array([[0.0], [1.0], [2.0], [10.0]])
    chosen, _ = k_center_greedy(line, first=0, max_points=None, costs=[3, 2, 2, 5], max_cost=7)
    assert chosen == [0, 2, 1]  # 10.0 costs 5, more than the 4 left: passed over


def test_fill_budget_in_examples_and_in_tokens() -> None:
    tokens = [5, 50, 7, 3, 9]
    assert fill_budget(range(5), tokens, 3, None) == [0, 1, 2]
    assert fill_budget(range(5), tokens, None, 20) == [0, 2, 3]  # 50 and then 9 do not fit
    assert sum(tokens[i] for i in fill_budget(range(5), tokens, None, 20)) <= 20


@pytest.mark.parametrize("unit,count", [("examples", 4), ("tokens", 60)])
def test_budgets_are_respected_with_diversity(unit: str, count: int) -> None:
    rng = np.random.default_rng(1)
    candidates = [candidate(str(i), f"p{i}", f"r{i}", tokens=int(t))
                  for i, t in enumerate(rng.integers(5, 30, size=20))]  # fmt: skip
    scores = {c.id: (1.0, 2.0, rng.normal(size=4).tolist()) for c in candidates}
    cfg = selection_cfg(steps=["diversity"], **{"budget.unit": unit, "budget.count": count})
    chosen = select_examples(candidates, cfg, given_scores(scores), 0)
    picked = chosen.table[chosen.table["status"] == SELECTED]
    if unit == "examples":
        assert len(picked) == count
    else:
        assert picked["tokens"].sum() <= count
        # nothing left out would still have fitted
        rest = chosen.table[chosen.table["status"] != SELECTED]
        assert (rest["tokens"] > count - picked["tokens"].sum()).all()


def test_a_selection_that_drops_everything_says_why_before_any_later_step() -> None:
    """Arithmetic replies are no text: the quality rule drops them all, and diversity (which
    would stack no embedding) never runs."""
    candidates = [candidate(str(i), f"what is {i} + 1", f"#### {i + 1}") for i in range(6)]
    scores = {c.id: (1.0, 2.0, [float(i), 1.0]) for i, c in enumerate(candidates)}
    cfg = selection_cfg(steps=["quality", "diversity"])
    with pytest.raises(ValueError, match=r"kept no training example of 6: \{'non_text': 6\}"):
        select_examples(candidates, cfg, given_scores(scores), 0)


def test_random_and_longest_fill_are_the_baselines() -> None:
    candidates = [candidate(str(i), f"p{i}", f"r{i}", tokens=i + 1) for i in range(10)]
    longest = select_examples(candidates, selection_cfg(**{"budget.count": 3, "budget.fill":
                                                           "longest"}), None, 0)  # fmt: skip
    assert longest.selected_ids == ["7", "8", "9"]
    randoms = [
        select_examples(candidates, selection_cfg(**{"budget.share": 0.3, "budget.fill": "random"}),
                        None, seed).selected_ids
        for seed in (0, 0, 1)
    ]  # fmt: skip
    assert randoms[0] == randoms[1] != randoms[2] and len(randoms[0]) == 3


# --- dedup and quality rules -----------------------------------------------------------------


JOKE = " ".join(f"word{i}" for i in range(60))


def test_duplicate_examples_and_prompts_are_removed_keeping_the_first() -> None:
    candidates = [
        candidate("a", "What is AI?", "The study of thinking machines."),
        candidate("b", "what is  AI?", "The study of thinking machines."),  # exact copy
        candidate("c", "What is AI", "A field of computer science."),  # same prompt words
        candidate("d", "Tell me a joke", JOKE),
        candidate("e", "Do you know a joke?", JOKE),  # another prompt, the same long reply
        candidate("f", "Who are you?", "I am a bot."),
    ]
    both = select_examples(candidates, selection_cfg(steps=["dedup"]), None, 0)
    reasons = both.table.set_index("id")["reason"].to_dict()
    assert reasons == {"a": "", "b": "duplicate_prompt", "c": "near_duplicate_prompt",
                       "d": "", "e": "near_duplicate_example", "f": ""}  # fmt: skip
    on_examples = selection_cfg(steps=["dedup"], **{"dedup.fields": ["example"]})
    whole = select_examples(candidates, on_examples, None, 0)
    assert whole.selected_ids == ["a", "c", "d", "f"]  # c answers differently: kept


def test_each_quality_rule_and_its_switch() -> None:
    q = selection_cfg().quality
    cases = {
        "empty_turn": candidate("1", "Hi?", "   "),
        "long_turn": candidate("2", "Hi?", "word " * 1000),
        "repeats_prompt": candidate("3", "Where do you live?", "where do you live"),
        "non_text": candidate("4", "Your number?", "555-1234 000-999 :-) 42"),
    }
    for reason, c in cases.items():
        assert rule_reason(c, q) == reason
    assert rule_reason(candidate("5", "Where do you live?", "In a computer."), q) is None
    off = selection_cfg(**{"quality.empty_turn": False, "quality.max_turn_chars": None,
                           "quality.max_prompt_similarity": None,
                           "quality.min_alpha_word_fraction": None}).quality  # fmt: skip
    assert all(rule_reason(c, off) is None for c in cases.values())


def test_a_selection_that_keeps_nothing_fails_with_the_reasons() -> None:
    candidates = [candidate(str(i), "Same?", "Same.") for i in range(3)]
    losses = {str(i): (2.0, 1.0, [0.0]) for i in range(3)}
    with pytest.raises(ValueError, match=r"kept no training example.*ifd_at_or_above_max"):
        select_examples(candidates, selection_cfg(steps=["ifd"]), given_scores(losses), 0)


# --- config failure paths --------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"finetune.selection.steps": ["dedup", "magic"]}, "invalid step.*magic"),
        ({"finetune.selection.steps": ["dedup", "dedup"]}, "lists a step twice"),
        ({"finetune.selection.steps": ["diversity"]}, "diversity.*set 'finetune.selection.budget"),
        ({"finetune.selection.budget.count": 5, "finetune.selection.budget.share": 0.5},
         "not both"),
        ({"finetune.selection.budget.share": 1.5}, "budget.share"),
        ({"finetune.selection.budget.unit": "words"}, "budget.unit"),
        ({"finetune.selection.dedup.fields": ["answer"]}, "dedup.fields"),
        ({"finetune.task": "classify", "finetune.dataset": "wordnet",
          "finetune.selection.steps": ["ifd"]}, "classify has none"),
    ],
)  # fmt: skip
def test_bad_selection_config_names_the_key(overrides: dict, message: str) -> None:
    cfg = OmegaConf.load(Path(__file__).parents[1] / "params.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError, match=message):
        checked_task(validate(cfg))  # the schema's rules, then the task's


# --- a task's selection: splits, determinism, the cache --------------------------------------


@pytest.fixture
def saved_model(tiny_model, tiny_tokenizer, tmp_path: Path) -> Path:
    path = tmp_path / "base"
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def finetune_cfg(**overrides):
    cfg = validate(OmegaConf.load(Path(__file__).parents[1] / "params.yaml")).finetune
    cfg.dataset = (
        "chatterbot"  # chat pairs: prompts repeat, replies are text (what selection judges)
    )
    cfg.max_len = 64
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_sft_selection_is_deterministic_cached_and_never_sees_val_or_test(
    saved_model: Path, tiny_tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = finetune_cfg(**{"selection.steps": ["dedup", "quality", "ifd", "diversity"],
                        "selection.budget.share": 0.25})  # fmt: skip
    task = finetuning_task("sft")
    cache = tmp_path / "cache"

    def run_selection(cfg):
        return select_for_task(task, cfg, saved_model, tiny_tokenizer, torch.device("cpu"), 1,
                               cache, process_env())  # fmt: skip

    first = run_selection(f)
    splits = task.splits(f)
    held_out = {c.id for c in splits["val"] + splits["test"]}
    encode = conversations.encode_conversation
    trainable = [c for c in splits["train"] if encode(tiny_tokenizer, c.messages, f.max_len)]
    assert first.table["id"].tolist() == [c.id for c in trainable]
    assert not set(first.table["id"]) & held_out
    assert first.table["ifd"].notna().all() and first.table["pca_x"].notna().all()
    assert len(first.selected_ids) <= int(0.25 * len(first.table))
    (cache_file,) = cache.glob("*.parquet")
    written = cache_file.stat().st_mtime_ns
    scored = len(pd.read_parquet(cache_file))
    # one row per distinct example (by its tokens)
    assert scored == len({example_key(c) for c in task.candidates(f, tiny_tokenizer)})

    # Another learning rate and step count: the scores are read back, none is recomputed,
    # and the same examples are chosen (the same hash).
    caplog.set_level(logging.INFO, logger="lmpipe.selection.scoring")
    again = run_selection(finetune_cfg(**{
        "selection.steps": ["dedup", "quality", "ifd", "diversity"],
        "selection.budget.share": 0.25, "optim.lr": 1e-2, "steps": 7}))  # fmt: skip
    assert cache_file.stat().st_mtime_ns == written
    assert (
        f"{scored} of {scored} examples scored before" in caplog.text
        and "0 to score" in caplog.text
    )
    digest = hashlib.sha256(first.table.to_csv().encode()).hexdigest()
    assert hashlib.sha256(again.table.to_csv().encode()).hexdigest() == digest
    assert again.selected_ids == first.selected_ids

    # Another starting model is another cache file.
    other = tmp_path / "other"
    other.mkdir()
    for file in saved_model.iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    with (other / "config.json").open("a") as handle:
        handle.write("\n")
    assert ScoreCache(cache, other).path != cache_file
    # So is another way of computing: a CUDA device, TF32 for its fp32 matmuls.
    assert ScoreCache(cache, saved_model).path == cache_file  # the CPU's, true fp32
    ways = [{"device": "cuda", "float32_matmul": p} for p in ("highest", "high")]
    paths = {ScoreCache(cache, saved_model, w).path for w in ways}
    assert len(paths) == 2 and cache_file not in paths


def test_only_unscored_examples_are_scored() -> None:
    candidates = [candidate(str(i), f"p{i}", f"r{i}", tokens=i + 2) for i in range(4)]
    asked: list[list[str]] = []

    def score(chosen, losses):
        asked.append([c.id for c in chosen])
        return pd.DataFrame({"conditional_loss": [1.0] * len(chosen),
                             "response_loss": [2.0] * len(chosen),
                             "embedding": [np.ones(2, np.float32)] * len(chosen)})  # fmt: skip

    class MemoryCache(ScoreCache):
        def __init__(self, path: Path) -> None:
            self.path = path

    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        cache = MemoryCache(Path(scratch) / "scores.parquet")
        cached_scores(candidates[:2], True, cache, score)
        result = cached_scores(candidates, True, cache, score)
    assert len(asked) == 2 and len(asked[1]) == 2  # the second call scored only the new two
    assert result["response_loss"].tolist() == [2.0] * 4


def test_classify_selection_uses_dedup_quality_and_diversity(
    saved_model: Path, tiny_tokenizer, tmp_path: Path
) -> None:
    f = finetune_cfg(task="classify", dataset="wordnet", categories=["noun.animal", "noun.food"],
                     max_per_class=20, max_len=32,
                     **{"selection.steps": ["dedup", "quality", "diversity"],
                        "selection.budget.count": 10})  # fmt: skip
    chosen = select_for_task(finetuning_task("classify"), f, saved_model, tiny_tokenizer,
                             torch.device("cpu"), 1, tmp_path, process_env())  # fmt: skip
    assert len(chosen.selected_ids) == 10
    assert chosen.table["ifd"].isna().all()  # no responses, no IFD
    assert chosen.table["pca_x"].notna().all()


def test_an_examples_key_covers_what_scoring_reads() -> None:
    """Two candidates score alike only if both the example and its response alone (IFD's
    denominator) are the same tokens."""
    from dataclasses import replace

    from lmpipe.selection.candidates import Candidate

    example = {"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]}
    alone = {"input_ids": [2, 7, 8], "labels": [IGNORE_INDEX, 7, 8]}
    candidate = Candidate("a", ("q", "r"), (("q", "r"),), example, alone)
    assert example_key(replace(candidate, id="b", turns=("x",))) == example_key(candidate)
    other_alone = {"input_ids": [3, 7, 8], "labels": [IGNORE_INDEX, 7, 8]}
    assert example_key(replace(candidate, responses_alone=other_alone)) != example_key(candidate)
    assert example_key(replace(candidate, responses_alone=None)) != example_key(candidate)
    other = {"input_ids": [5, 6, 7, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 9]}
    assert example_key(replace(candidate, example=other)) != example_key(candidate)
