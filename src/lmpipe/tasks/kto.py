"""KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306): a causal LM tuned on
replies judged one at a time, desirable or not, instead of on pairs.

With r = β (log π(y|x) − log π_ref(y|x)) and z₀ = max(0, mean over the batch of
log π(y'|x) − log π_ref(y'|x)) on mismatched replies y' (detached), a desirable example
costs λ_D (1 − σ(r − β z₀)) and an undesirable one λ_U (1 − σ(β z₀ − r)); the loss is their
mean, as TRL's KTOTrainer (`loss_type="kto"`) computes it. Under several processes z₀ is
averaged over them, as TRL gathers it.

The examples come from users' files in TRL's format, or from the verifier on tasks with
checkable answers: the starting model's own sampled replies, each labelled by the answer
checker. Held-out quality is SFT's (exact-match answer accuracy on every held-out problem,
or the held-out desirable replies' loss and overlap for files).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.data.batches import ordered_examples, shuffled_examples
from lmpipe.evaluation.lm_metrics import eval_mode
from lmpipe.feedback.judge import judge
from lmpipe.feedback.pairs import sample_replies
from lmpipe.runs.config import (
    ConfigError,
    EvaluateConfig,
    FinetuneConfig,
    HardwareConfig,
    KtoConfig,
)
from lmpipe.runs.keys import directory_digest, keyed_path
from lmpipe.runs.processes import DistEnv
from lmpipe.selection.candidates import Candidate
from lmpipe.taskdata import pairs as pref
from lmpipe.taskdata import unpaired
from lmpipe.taskdata.conversations import Conversation
from lmpipe.taskdata.unpaired import Judged, JudgedExample
from lmpipe.tasks.base import (
    FinetuningTask,
    Objective,
    TrainingSetup,
    cached_table,
    chosen,
    reference_by_split,
)
from lmpipe.tasks.preference import CACHE_DIR as PAIRS_CACHE_DIR
from lmpipe.tasks.preference import PAIRS_FILE
from lmpipe.tasks.sft import (
    SFT,
    VERIFIABLE_DATASETS,
    conversation_splits,
    selection_candidate,
    sft_phase_config,
)
from lmpipe.training import distributed
from lmpipe.training.logprobs import reply_logps
from lmpipe.training.loop import policy_numerics
from lmpipe.training.model import load_model

log = logging.getLogger(__name__)

EXAMPLES_FILE = "pairs.parquet"  # finetune's table of derived data (dvc.yaml's out)
EXAMPLES_VERSION = 2  # 2: samples seeded per batch; the reference in the training's shapes


def kto_losses(
    k: KtoConfig | DictConfig,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    desirable: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each example's weighted KTO loss, its reward β (log π − log π_ref) and z₀ (the
    KL estimate, detached, averaged over processes, at least 0)."""
    kl = (kl_logps - ref_kl_logps).mean().detach()
    if torch.distributed.is_initialized():
        kl = distributed.all_reduce_sum(kl.clone()) / torch.distributed.get_world_size()
    kl = kl.clamp(min=0)
    ratios = logps - ref_logps
    desirable_losses = k.desirable_weight * (1 - torch.sigmoid(k.beta * (ratios - kl)))
    undesirable_losses = k.undesirable_weight * (1 - torch.sigmoid(k.beta * (kl - ratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, k.beta * ratios.detach(), kl


def kto_metric_sums(
    losses: torch.Tensor, rewards: torch.Tensor, kl: torch.Tensor, desirable: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sums over the examples, for averaging per step: z₀, and the rewards signed so that
    a desirable reply's counts up and an undesirable one's down (higher is better)."""
    signed = torch.where(desirable, rewards, -rewards)
    return {"kl": kl * len(losses), "rewards/signed": signed.sum(),
            "desirable": desirable.float().sum()}  # fmt: skip


class KtoLoss(Objective):
    """The training objective: the summed KTO losses of a micro-batch; target = example."""

    name = "kto"
    data_file = PAIRS_FILE
    data_cache = PAIRS_CACHE_DIR
    loss_is_per_token = False

    def __init__(self, k: KtoConfig | DictConfig) -> None:
        self.k = k
        self._sums: dict[str, torch.Tensor] = {}

    def target_count(self, batch: Mapping[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0]

    def loss_sum(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        losses, rewards, kl = self.losses(model, batch)
        for name, value in kto_metric_sums(losses, rewards, kl, batch["desirable"]).items():
            self._sums[name] = self._sums.get(name, 0) + value.detach()
        return losses.sum()

    def losses(
        self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logps, _ = reply_logps(model, batch)
        with torch.no_grad():  # the KL estimate takes no gradient (TRL's neither)
            kl_batch = {k.removeprefix("kl_"): v for k, v in batch.items() if k.startswith("kl_")}
            kl_logps, _ = reply_logps(model, kl_batch)
        return kto_losses(self.k, logps, batch["ref_logps"], kl_logps, batch["ref_kl_logps"],
                          batch["desirable"])  # fmt: skip

    def take_metric_sums(self) -> dict[str, torch.Tensor]:
        sums, self._sums = self._sums, {}
        return sums


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    examples: Sequence[JudgedExample],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    width: int | None = None,
) -> list[Judged]:
    """The examples with the (frozen, starting) model's log-probs of both replies, in the
    training's micro-batch size and row width (`unpaired.judged_width`), their batches
    shared by the processes."""

    def fill(_: int, chunk: Sequence[JudgedExample]) -> list[Judged]:
        batch = unpaired.collate_judged(chunk, pad_id, with_reference=False, width=width)
        batch = {k: v.to(device) for k, v in batch.items()}
        logps, _ = reply_logps(model, batch)
        kl_logps, _ = reply_logps(model, {k.removeprefix("kl_"): v for k, v in batch.items()
                                          if k.startswith("kl_")})  # fmt: skip
        values = zip(chunk, logps.tolist(), kl_logps.tolist(), strict=True)
        return [replace(e.judged, ref_logp=a, ref_kl_logp=b) for e, a, b in values]

    with eval_mode(model):
        return distributed.map_batches(fill, examples, batch_size, "kto: the reference's log-probs")


def judge_replies(conversation: Conversation, replies: Sequence[str]) -> list[Judged]:
    """A prompt's sampled replies, each labelled by the answer checker; the reference
    solution joins them as desirable where none is right. Empty replies are skipped."""
    if conversation.answer is None:
        raise ValueError(f"kto example {conversation.id}: no answer to check replies against")
    prompt, solution = conversation.messages[:-1], conversation.messages[-1]["content"]
    judged = [Judged(f"{conversation.id}:{i}", prompt, reply,
                     judge(reply, conversation.answer).correct, answer=conversation.answer)
              for i, reply in enumerate(replies) if reply]  # fmt: skip
    if not any(j.desirable for j in judged):
        judged.append(Judged(f"{conversation.id}:reference", prompt, solution, True,
                             answer=conversation.answer))  # fmt: skip
    return judged


def verifier_examples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Mapping[str, Sequence[Conversation]],
    k: KtoConfig | DictConfig,
    device: torch.device,
    seed: int,
) -> dict[str, list[Judged]]:
    """The training and validation examples: the model's own sampled replies to the
    split's problems, judged by the checker."""
    # The test split is scored on every held-out problem (`KTO.held_out_conversations`),
    # never on judged replies: none are sampled for it.
    result: dict[str, list[Judged]] = {"test": []}
    for split in ("train", "val"):
        items = conversations[split]
        limit = k.max_prompts if split == "train" else k.max_held_out_prompts
        items = pref.stable_sample(items, limit)
        samples = sample_replies(model, tokenizer, [c.prompt for c in items], k, device, seed)
        result[split] = [j for c, replies in zip(items, samples, strict=True)
                         for j in judge_replies(c, replies)]  # fmt: skip
        desirable = sum(j.desirable for j in result[split])
        log.info("kto: %s: %d replies to %d prompts, %d desirable (%d of them reference "
                 "solutions)", split, len(result[split]), len(items), desirable,
                 sum(j.id.endswith(":reference") for j in result[split]))  # fmt: skip
    return result


def _cache_path(
    cache_dir: Path, base: Path, f: FinetuneConfig | DictConfig, seed: int,
    numerics: Mapping[str, object],
) -> Path:  # fmt: skip
    """The cached examples of one starting model and one way of building them (and of
    computing the reference's log-probs: `numerics`, the micro-batch size)."""
    k = f.kto
    key: dict = {"version": EXAMPLES_VERSION, "examples": k.examples, "max_len": f.max_len,
                 "batch_size": f.batch_size, "val_fraction": f.val_fraction,
                 "test_fraction": f.test_fraction, "numerics": dict(numerics)}  # fmt: skip
    if k.examples == "files":
        key["files"] = [hashlib.md5(path.read_bytes()).hexdigest()
                        for path in unpaired.expand_paths(k.files)]  # fmt: skip
    else:
        key |= {"dataset": f.dataset, "samples": k.samples, "temperature": k.temperature,
                "max_new_tokens": k.max_new_tokens, "max_prompts": k.max_prompts,
                "max_held_out_prompts": k.max_held_out_prompts, "seed": seed}  # fmt: skip
        key["reasoning_gym"] = OmegaConf.to_container(OmegaConf.structured(f.reasoning_gym))
    return keyed_path(cache_dir, {"base": directory_digest(base), **key}, ".parquet")


class KTO(SFT):
    """KTO on judged replies; evaluated like SFT. Made with its examples: `prepare`
    (finetune) builds them and `held_out` (evaluate, deploy) reads them back; `KTO()` alone
    is the task before it has any."""

    name = "kto"

    def __init__(self, examples: Mapping[str, list[Judged]] | None = None) -> None:
        self.examples = dict(examples) if examples is not None else None

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        f = cfg.finetune
        k, key = f.kto, "finetune.kto"
        if k.examples == "files" and not k.files:
            raise ConfigError(f"'{key}.examples' is files but '{key}.files' lists none")
        if k.examples != "files" and k.files:
            raise ConfigError(f"'{key}.files' is set but '{key}.examples' is {k.examples}: "
                              f"set {key}.examples=files to train on them")  # fmt: skip
        if k.examples == "verifier" and f.dataset not in VERIFIABLE_DATASETS:
            raise ConfigError(f"'{key}.examples' is verifier, which needs answers a program "
                              f"can check: finetune.dataset={f.dataset} has none (allowed: "
                              f"{VERIFIABLE_DATASETS})")  # fmt: skip
        if f.packing:
            raise ConfigError("finetune.packing: KTO examples are not packed (each carries "
                              "its KL reply); set finetune.packing=false")  # fmt: skip

    def supervised_task(self) -> FinetuningTask:
        """SFT on the same conversations (deploy's calibration and recovery)."""
        return SFT()

    def sft_first(self, f: FinetuneConfig | DictConfig) -> DictConfig | None:
        """`sft_steps` of SFT at `sft_lr` (lmpipe.tasks.sft.sft_phase_config): the model KTO
        then starts from and takes as its reference, as in KTO's paper."""
        return sft_phase_config(f, f.kto.sft_steps, f.kto.sft_lr)

    def disables_dropout(self, f: FinetuneConfig) -> bool:
        return f.kto.disable_dropout

    # -- data ------------------------------------------------------------------------------

    def prepare(
        self,
        f: FinetuneConfig | DictConfig,
        base: Path,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        cache_dir: Path,
        env: DistEnv,
        hardware: HardwareConfig | None = None,
        seed: int = 0,
    ) -> tuple[KTO, pd.DataFrame]:
        """Build (or read from the cache) the judged examples with the reference's
        log-probs of the starting model `base`: the task made with them, and their table."""
        hardware = hardware or HardwareConfig()
        table = cached_table(
            _cache_path(cache_dir, base, f, seed, policy_numerics(hardware, device)),
            lambda: unpaired.judged_table(self._build(f, base, tokenizer, device, hardware,
                                                      seed)),
            env, "kto: examples and reference log-probs",
        )  # fmt: skip
        return KTO(unpaired.judged_from_table(table)), table

    def _build(
        self,
        f: FinetuneConfig | DictConfig,
        base: Path,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        hardware: HardwareConfig,
        seed: int,
    ) -> dict[str, list[Judged]]:
        k = f.kto
        model = load_model(base).to(device)
        if k.examples == "files":
            read = unpaired.read_files(list(k.files), "finetune.kto.files")
            splits = unpaired.split_judged(read, f.val_fraction, f.test_fraction)
        else:
            splits = verifier_examples(model, tokenizer, conversation_splits(f), k, device, seed)
        encoded = {split: unpaired.encode_judged(tokenizer, unpaired.with_kl_completions(
                       examples, f.batch_size), f.max_len)
                   for split, examples in splits.items()}  # fmt: skip
        compute = partial(reference_logps, batch_size=f.batch_size,
                          pad_id=tokenizer.pad_token_id, device=device,
                          width=unpaired.judged_width(*encoded.values()))  # fmt: skip
        return reference_by_split(model, hardware, device, encoded, compute)

    def splits(self, f: FinetuneConfig) -> dict[str, list[Judged]]:
        if self.examples is None:
            raise RuntimeError("KTO() has no examples: use the task that prepare (finetune) "
                               "or held_out (evaluate) returns")  # fmt: skip
        return self.examples

    def held_out(self, f: FinetuneConfig, finetune_dir: Path) -> KTO:
        return KTO(unpaired.read_judged_table(finetune_dir / EXAMPLES_FILE))

    def candidates(self, f: FinetuneConfig, tokenizer: PreTrainedTokenizerBase) -> list[Candidate]:
        """Selection judges an example by its prompt and reply."""
        found = (selection_candidate(tokenizer, e.conversation, f.max_len)
                 for e in self.splits(f)["train"])  # fmt: skip
        return [c for c in found if c is not None]

    def answers_checkable(self, f: FinetuneConfig | DictConfig) -> bool:
        """Examples the verifier judged are scored on the dataset's problems."""
        return f.kto.examples == "verifier"

    def held_out_conversations(self, f: FinetuneConfig) -> dict[str, list[Conversation]]:
        """What SFT's metrics score: with checkable answers, every problem of
        finetune.dataset (built from it by the verifier); else the examples' prompts with
        their desirable replies."""
        if self.answers_checkable(f):
            return conversation_splits(f)
        return {name: [e.conversation for e in items if e.desirable]
                for name, items in self.splits(f).items()}  # fmt: skip

    # -- training --------------------------------------------------------------------------

    def setup(
        self,
        f: FinetuneConfig,
        base: Path,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        train_ids: Collection[str] | None = None,
    ) -> TrainingSetup:
        model = load_model(base)
        splits = self.splits(f)
        # Reference log-probs were taken with these KL replies, in these shapes (`_build`).
        encoded = {split: unpaired.encode_judged(tokenizer, examples, f.max_len)
                   for split, examples in splits.items()}  # fmt: skip
        train = chosen(encoded["train"], train_ids)
        val = encoded["val"]
        collate = partial(unpaired.collate_judged, pad_id=tokenizer.pad_token_id,
                          width=unpaired.judged_width(*encoded.values()))  # fmt: skip
        objective = KtoLoss(f.kto)

        def validate(m: torch.nn.Module) -> dict[str, float]:
            totals: dict[str, float] = {}
            count = 0
            with torch.no_grad(), eval_mode(m):
                val_batches = ordered_examples(val, f.batch_size, collate)
                for _, batch in zip(range(f.eval_batches), val_batches, strict=False):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    losses, rewards, kl = objective.losses(m, batch)
                    sums = {"loss": losses.sum(),
                            **kto_metric_sums(losses, rewards, kl, batch["desirable"])}  # fmt: skip
                    for name, value in sums.items():
                        totals[name] = totals.get(name, 0.0) + float(value)
                    count += len(losses)
            return {name: value / count for name, value in totals.items()}

        batches = shuffled_examples(train, f.batch_size, collate, seed, rank, world_size)
        counts = {"train_examples": len(train), "val_examples": len(val),
                  "train_desirable": sum(e.judged.desirable for e in train)}  # fmt: skip
        return TrainingSetup(model, batches, objective, validate if val else None, counts)

    # -- evaluation ------------------------------------------------------------------------

    def predict(
        self,
        models: Mapping[str, PreTrainedModel],
        tokenizer: PreTrainedTokenizerBase,
        splits: Mapping[str, Sequence],
        f: FinetuneConfig,
        e: EvaluateConfig,
    ) -> pd.DataFrame:
        """SFT's table on the held-out conversations (`held_out_conversations`)."""
        return super().predict(models, tokenizer, self.held_out_conversations(f), f, e)
