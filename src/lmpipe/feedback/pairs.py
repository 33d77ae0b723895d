"""Preference pairs built from a model's own replies (`finetune.preference.pairs`):
- `spin`: as SPIN does, chosen = a conversation's reference reply, rejected = the starting
  model's greedy reply;
- `verifier` (checkable answers): the starting model's sampled replies judged by the answer
  checker, chosen = a correct reply of the model's own (the reference solution where none
  is), rejected = a wrong one.
(Pairs from users' files: lmpipe.taskdata.pairs.) Replies come from lmpipe.feedback.rollouts
and verdicts from lmpipe.feedback.judge, the path every feedback method shares.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.feedback import rollouts
from lmpipe.feedback.judge import judge
from lmpipe.runs.config import PreferenceConfig
from lmpipe.taskdata import conversations
from lmpipe.taskdata import pairs as pref

log = logging.getLogger(__name__)


def spin_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Mapping[str, Sequence[conversations.Conversation]],
    p: PreferenceConfig | DictConfig,
    device: torch.device,
) -> dict[str, list[pref.Pair]]:
    """SPIN's pairs from each conversation's opening exchange: chosen = the human reply,
    rejected = the model's greedy reply of at least one token (each distinct prompt answered
    once)."""
    splits = opening_pairs(conversations, p.max_pairs, p.max_held_out_pairs)
    prompts = sorted({pair.prompt[0]["content"] for pairs in splits.values() for pair in pairs})
    log.info("preference: the starting model answers %d distinct prompts (greedy, %d tokens)",
             len(prompts), p.max_new_tokens)  # fmt: skip
    # At least one token: an empty reply is no reply to prefer another to.
    greedy = rollouts.Sampling(p.max_new_tokens, min_new_tokens=1)
    replies = [group[0].text for group in rollouts.sample(
        model, tokenizer, prompts, 1, greedy, 0, p.batch_size, device,
        "preference: the starting model's replies")]  # fmt: skip
    answer = dict(zip(prompts, replies, strict=True))
    result: dict[str, list[pref.Pair]] = {}
    for split, pairs in splits.items():
        built = [replace(pair, rejected=answer[pair.prompt[0]["content"]]) for pair in pairs]
        kept = [pair for pair in built if pair.rejected and pair.rejected != pair.chosen]
        if len(kept) < len(built):
            log.info("preference: %d %s pairs dropped: the model's reply is empty or the human "
                     "one", len(built) - len(kept), split)  # fmt: skip
        result[split] = kept
    return result


def opening_pairs(
    conversations: Mapping[str, Sequence[conversations.Conversation]],
    max_pairs: int | None,
    max_held_out_pairs: int | None = None,
) -> dict[str, list[pref.Pair]]:
    """Each conversation's opening exchange as a pair with its reference reply chosen and
    no rejected reply yet; at most `max_pairs` training ones and `max_held_out_pairs` per
    held-out split (stable hash samples)."""
    splits = {
        split: [pref.Pair(c.id, c.messages[:1], c.messages[1]["content"].strip(), "",
                          answer=c.answer) for c in items]
        for split, items in conversations.items()
    }  # fmt: skip
    return {
        split: pref.stable_sample(pairs, max_pairs if split == "train" else max_held_out_pairs)
        for split, pairs in splits.items()
    }


def judge_samples(pair: pref.Pair, replies: Sequence[str]) -> tuple[pref.Pair | None, str]:
    """The pair the answer checker makes of a prompt's sampled replies, and where its chosen
    reply came from: `model` (the first correct sample), `reference` (no sample is correct:
    the reference solution) or `solved` (no sample is wrong: no pair, None). Empty replies
    are no reply to prefer another to, and are skipped."""
    if pair.answer is None:
        raise ValueError(f"preference pair {pair.id}: no answer to check replies against")
    replies = [r for r in replies if r]
    correct = [r for r in replies if judge(r, pair.answer).correct]
    wrong = [r for r in replies if not judge(r, pair.answer).correct]
    if not wrong:
        return None, "solved"
    if correct:
        return replace(pair, chosen=correct[0], rejected=wrong[0]), "model"
    return replace(pair, rejected=wrong[0]), "reference"


def sample_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    p: PreferenceConfig | DictConfig,
    device: torch.device,
    seed: int,
) -> list[list[str]]:
    """`p.samples` replies of at least one token per prompt at `p.temperature` (`p`: the
    preference or KTO settings), the same ones for the same seed and any number of
    processes (lmpipe.feedback.rollouts.sample)."""
    sampling = rollouts.Sampling(p.max_new_tokens, p.temperature, min_new_tokens=1)
    groups = rollouts.sample(model, tokenizer, prompts, p.samples, sampling, seed,
                             p.batch_size, device)  # fmt: skip
    return [[c.text for c in group] for group in groups]


def verifier_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Mapping[str, Sequence[conversations.Conversation]],
    p: PreferenceConfig | DictConfig,
    device: torch.device,
    seed: int,
) -> dict[str, list[pref.Pair]]:
    """Pairs from the model's own sampled replies, judged by the answer checker
    (`judge_samples`), in every split; how many prompts took each route is logged."""
    result: dict[str, list[pref.Pair]] = {}
    for split, pairs in opening_pairs(conversations, p.max_pairs, p.max_held_out_pairs).items():
        log.info("preference: %d replies to each of %d %s prompts (temperature %g, %d tokens)",
                 p.samples, len(pairs), split, p.temperature, p.max_new_tokens)  # fmt: skip
        samples = sample_replies(model, tokenizer, [q.prompt[0]["content"] for q in pairs], p,
                                 device, seed)  # fmt: skip
        outcomes = Counter[str]()
        result[split] = []
        for pair, replies in zip(pairs, samples, strict=True):
            judged, outcome = judge_samples(pair, replies)
            outcomes[outcome] += 1
            if judged is not None:
                result[split].append(judged)
        log.info("preference: %s: %d pairs with the model's own correct reply chosen, %d with "
                 "the reference solution, %d prompts answered right in every sample (no pair)",
                 split, outcomes["model"], outcomes["reference"], outcomes["solved"])  # fmt: skip
    return result
