"""Masked language modelling (BERT's objective) for encoders.

A share of the non-special tokens (15% by default) becomes a target; of those, 80% are
replaced by the mask token, 10% by a random token and 10% left as they are (BERT's
80/10/10), and with whole-word masking all the tokens of a chosen word go together. The
masks of a batch are a pure function of (seed, batch index, rank): a resumed run draws
exactly the masks the uninterrupted run drew, so it ends bit-identical.

Training computes the vocabulary head only at the targets (`MaskedPositions`): a batch
carries their flat positions, padded to a fixed count per run (`target_slots`) so that
compiled shapes stay static. The head at every position took 1.6x the time per token
(benchmarks/mlm_throughput.py --small --device cpu, 16k vocabulary).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import MaskedLMOutput

from lmpipe.data.batches import (
    IGNORE_INDEX,
    Batch,
    ShuffledBatches,
    sequential_windows,
    window_batches,
)
from lmpipe.data.tokenizer import CLS, MASK, SEP
from lmpipe.evaluation.lm_metrics import eval_mode
from lmpipe.runs.config import MaskingConfig, PretrainConfig
from lmpipe.tasks.base import PretrainingTask, TrainingSetup

log = logging.getLogger(__name__)

# Mask streams: training batches and the fixed validation batches never share a draw.
TRAIN_STREAM, VAL_STREAM = 0, 1
# Target slots per batch over the expected target count, and their rounding: the count of a
# batch exceeds 1.25x its mean only rarely (whole words move together), and then its slots
# round up to the next multiple (one more compiled shape).
SLOT_HEADROOM, SLOT_MULTIPLE = 1.25, 64


@dataclass(frozen=True)
class Vocabulary:
    """Per token id: can it be masked, does it start a word; and the mask token's id."""

    maskable: torch.Tensor  # bool [vocab]: not a special token
    word_start: torch.Tensor  # bool [vocab]: begins a word, or is special
    mask_id: int

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> Vocabulary:
        if tokenizer.mask_token_id is None:
            raise ValueError(
                "masked-LM pretraining needs a tokenizer with a mask token: tokenize with an "
                "encoder model (model.family=encoder adds <|cls|>, <|sep|> and <|mask|>)"
            )
        size = len(tokenizer)
        maskable = torch.ones(size, dtype=torch.bool)
        maskable[tokenizer.all_special_ids] = False
        pieces = [p or "" for p in tokenizer.convert_ids_to_tokens(list(range(size)))]
        if any(p.startswith("##") for p in pieces):  # WordPiece (BERT): "##" continues a word
            word_start = torch.tensor([not p.startswith("##") for p in pieces])
        else:  # byte-level BPE: a word starts with its space, "Ġ"
            word_start = torch.tensor([p.startswith("Ġ") for p in pieces])
        return cls(maskable, word_start | ~maskable, tokenizer.mask_token_id)


def mask_generator(
    seed: int, index: int, rank: int = 0, stream: int = TRAIN_STREAM
) -> torch.Generator:
    """The generator of one batch's masks, from (seed, batch index, rank, stream) alone."""
    state = np.random.SeedSequence([seed, stream, rank, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def mask_tokens(
    input_ids: torch.Tensor,
    vocabulary: Vocabulary,
    masking: MaskingConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs with masks applied, labels: the original token at targets, -100 elsewhere)."""
    maskable = vocabulary.maskable[input_ids]
    draws = torch.rand(input_ids.shape, generator=generator)
    if masking.whole_word:
        # Every token takes the draw of the token that starts its word (a row's first
        # token starts one, whatever it is: the window may cut a word).
        starts = vocabulary.word_start[input_ids].clone()
        starts[:, 0] = True
        word_of = torch.cumsum(starts, dim=1) - 1
        first_token = torch.zeros_like(input_ids)
        rows, cols = starts.nonzero(as_tuple=True)
        first_token[rows, word_of[rows, cols]] = cols
        draws = draws.gather(1, first_token.gather(1, word_of))
    targets = (draws < masking.probability) & maskable
    labels = torch.where(targets, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = torch.rand(input_ids.shape, generator=generator)
    to_mask = targets & (action < masking.mask_share)
    to_random = targets & ~to_mask & (action < masking.mask_share + masking.random_share)
    candidates = vocabulary.maskable.nonzero().squeeze(1)
    random_ids = candidates[torch.randint(len(candidates), input_ids.shape, generator=generator)]
    inputs = torch.where(to_mask, torch.full_like(input_ids, vocabulary.mask_id), input_ids)
    return torch.where(to_random, random_ids, inputs), labels


def _slot_count(targets: int) -> int:
    """`targets` rounded up to a multiple of SLOT_MULTIPLE (at least one multiple)."""
    return max(SLOT_MULTIPLE, math.ceil(targets / SLOT_MULTIPLE) * SLOT_MULTIPLE)


def target_slots(tokens: int, masking: MaskingConfig) -> int:
    """How many target positions a batch of `tokens` tokens carries (`with_target_slots`)."""
    return _slot_count(math.ceil(tokens * masking.probability * SLOT_HEADROOM))


def with_target_slots(inputs: torch.Tensor, labels: torch.Tensor, slots: int) -> Batch:
    """A training batch: the masked inputs, and the targets' flat positions and labels,
    padded to `slots` (position 0, label ignored), or to the next multiple of
    SLOT_MULTIPLE when a batch holds more targets."""
    positions = (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
    if len(positions) > slots:
        log.debug("masked LM: %d targets over the %d slots", len(positions), slots)
        slots = _slot_count(len(positions))
    padded = torch.zeros(slots, dtype=torch.long)
    padded[: len(positions)] = positions
    targets = torch.full((slots,), IGNORE_INDEX, dtype=torch.long)
    targets[: len(positions)] = labels.flatten()[positions]
    return {"input_ids": inputs, "target_positions": padded, "target_labels": targets}


class MaskedPositions:
    """A masked LM whose forward, given `target_positions` (flat indices into the batch's
    tokens), runs the vocabulary head at those positions only: logits [positions, vocab].
    Mixed into the model's own class (`predicting_targets_only`), so DDP, FSDP2 and compile
    wrap it as they wrap any model, and it saves as what it is."""

    def forward(self, input_ids=None, target_positions=None, **kwargs):
        if target_positions is None:
            return super().forward(input_ids=input_ids, **kwargs)
        hidden = self.base_model(input_ids=input_ids, **kwargs).last_hidden_state
        picked = hidden.flatten(0, 1).index_select(0, target_positions)
        return MaskedLMOutput(logits=mlm_head(self)(picked))


def mlm_head(model: PreTrainedModel) -> torch.nn.Module:
    """The module from the encoder's last hidden state to the vocabulary (BERT's `cls`:
    transform, layer norm, decoder)."""
    head = getattr(model, "cls", None)
    if head is None:
        raise ValueError(f"{type(model).__name__}: no BERT-style `cls` head to predict masked "
                         "tokens with")  # fmt: skip
    return head


def predicting_targets_only(model: PreTrainedModel) -> PreTrainedModel:
    """`model`, its class now its own class with `MaskedPositions` mixed in (same name, so
    its saved config names the architecture as before)."""
    cls = type(model)
    if not issubclass(cls, MaskedPositions):
        mlm_head(model)
        model.__class__ = type(cls.__name__, (MaskedPositions, cls), {"__module__": __name__})
    return model


class MaskedBatches:
    """Token-window batches with their masks applied: micro-batch `position` is masked by
    the generator of (seed, position, rank). `position` is the window batches' own, so a
    checkpoint's data position restores both the windows and the masks."""

    def __init__(
        self, windows: ShuffledBatches, vocabulary: Vocabulary, masking: MaskingConfig, seed: int,
        slots: int,
    ) -> None:  # fmt: skip
        self.windows, self.vocabulary, self.masking, self.seed = windows, vocabulary, masking, seed
        self.slots = slots

    @property
    def position(self) -> int:
        return self.windows.position

    @position.setter
    def position(self, value: int) -> None:
        self.windows.position = value

    def __iter__(self) -> MaskedBatches:
        return self

    def __next__(self) -> Batch:
        generator = mask_generator(self.seed, self.windows.position, self.windows.rank)
        ids = next(self.windows)["input_ids"]
        inputs, labels = mask_tokens(ids, self.vocabulary, self.masking, generator)
        return with_target_slots(inputs, labels, self.slots)


def masked_windows(
    tokens: np.ndarray, vocabulary: Vocabulary, masking: MaskingConfig, seed: int,
    batch_size: int, seq_len: int, max_tokens: int | None,
) -> list[Batch]:  # fmt: skip
    """The fixed evaluation batches: windows from the start, each masked by its index."""
    batches = []
    for index, batch in enumerate(sequential_windows(tokens, batch_size, seq_len, max_tokens)):
        generator = mask_generator(seed, index, stream=VAL_STREAM)
        inputs, labels = mask_tokens(batch["input_ids"], vocabulary, masking, generator)
        batches.append({"input_ids": inputs, "labels": labels})
    return batches


def unigram_log_probs(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> torch.Tensor:
    """log p(token) from the training tokens' counts, add-one smoothed (counted a chunk at a
    time: the stream may be memory-mapped shards larger than memory)."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for start in range(0, len(tokens), chunk):
        counts += np.bincount(np.asarray(tokens[start : start + chunk]), minlength=vocab_size)
    return torch.from_numpy(np.log(counts / counts.sum())).float()


@torch.no_grad()
def masked_scores(
    model: torch.nn.Module,
    batches: list[Batch],
    device: torch.device,
    unigram: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean MLM loss, masked-token accuracy and (with `unigram`) the unigram baseline's loss,
    all over the same masked positions."""
    loss, hits, targets, unigram_loss = 0.0, 0, 0, 0.0
    with eval_mode(model):
        for batch in batches:
            labels = batch["labels"].to(device)
            logits = model(input_ids=batch["input_ids"].to(device)).logits.float()
            chosen = labels != IGNORE_INDEX
            loss += float(F.cross_entropy(logits[chosen], labels[chosen], reduction="sum"))
            hits += int((logits[chosen].argmax(-1) == labels[chosen]).sum())
            targets += int(chosen.sum())
            if unigram is not None:
                unigram_loss -= float(unigram[labels[chosen].cpu()].sum())
    if targets == 0:
        raise ValueError("no masked tokens to score: more or longer validation windows needed")
    scores = {"loss": loss / targets, "accuracy": hits / targets, "targets": float(targets)}
    if unigram is not None:
        scores["unigram_loss"] = unigram_loss / targets
    return scores


class MaskedLM(PretrainingTask):
    name = "masked_lm"
    family: ClassVar[str] = "encoder"

    def __init__(self, masking: MaskingConfig, seed: int) -> None:
        self.masking, self.seed = masking, seed
        self._validation_key: tuple | None = None
        self._validation: tuple[list[Batch], torch.Tensor] = ([], torch.empty(0))

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        """A decoder's tokenizer (tokenize ran for another model family, e.g. in a sweep over
        models) gets [CLS]/[SEP]/[MASK] appended, so the encoder can still be pretrained."""
        missing = {
            name: token
            for name, token in (("cls_token", CLS), ("sep_token", SEP), ("mask_token", MASK))
            if getattr(tokenizer, f"{name}_id") is None
        }
        if missing and tokenizer.cls_token_id is None:
            log.warning(
                "masked LM: the tokenizer has no %s: added for this model; tokenize with "
                "model.family=encoder to frame documents as [CLS] doc [SEP]",
                "/".join(missing.values()),
            )
        if missing:
            tokenizer.add_special_tokens(missing)
        return tokenizer

    def target_count(self, batch: Batch) -> int:
        return int((batch["target_labels"] != IGNORE_INDEX).sum())

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"],
                       target_positions=batch["target_positions"]).logits.float()  # fmt: skip
        return F.cross_entropy(logits, batch["target_labels"], ignore_index=IGNORE_INDEX,
                               reduction="sum")  # fmt: skip

    def setup(
        self,
        p: PretrainConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> TrainingSetup:
        vocabulary = Vocabulary.of(tokenizer)
        val, unigram = self._validation_set(p, tokenizer, train_tokens, val_tokens)

        def validate(m: torch.nn.Module) -> dict[str, float]:
            scores = masked_scores(m, val, device, unigram)
            del scores["targets"]
            return scores

        windows = window_batches(train_tokens, p.seq_len, p.batch_size, seed, rank, world_size)
        slots = target_slots(p.batch_size * p.seq_len, self.masking)
        batches = MaskedBatches(windows, vocabulary, self.masking, seed, slots)
        return TrainingSetup(predicting_targets_only(model), batches, self, validate)

    def baseline(
        self, p: PretrainConfig, tokenizer: PreTrainedTokenizerBase, train_tokens: np.ndarray,
        val_tokens: np.ndarray,
    ) -> dict[str, float]:  # fmt: skip
        val, unigram = self._validation_set(p, tokenizer, train_tokens, val_tokens)
        labels = torch.cat([b["labels"].flatten() for b in val])
        labels = labels[labels != IGNORE_INDEX]
        return {"unigram_loss": float(-unigram[labels].mean())}

    def _validation_set(
        self, p: PretrainConfig, tokenizer: PreTrainedTokenizerBase, train_tokens: np.ndarray,
        val_tokens: np.ndarray,
    ) -> tuple[list[Batch], torch.Tensor]:  # fmt: skip
        """The masked validation batches and the training unigram log-probs, made once per
        token streams: counting the training stream reads all of it, and setup and baseline
        both need them."""
        key = (id(train_tokens), id(val_tokens), p.batch_size, p.seq_len, self.val_span(p))
        if self._validation_key != key:
            val = masked_windows(val_tokens, Vocabulary.of(tokenizer), self.masking, self.seed,
                                 p.batch_size, p.seq_len, self.val_span(p))  # fmt: skip
            self._validation = (val, unigram_log_probs(train_tokens, len(tokenizer)))
            self._validation_key = key
        return self._validation

    def load(self, path: Path) -> PreTrainedModel:
        return AutoModelForMaskedLM.from_pretrained(
            str(path), attn_implementation="sdpa", use_safetensors=True, trust_remote_code=False
        )

    def corpus_loss(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        max_tokens: int,
        device: torch.device,
    ) -> tuple[float, int]:
        batches = masked_windows(tokens, Vocabulary.of(tokenizer), self.masking, self.seed,
                                 batch_size, seq_len, max_tokens)  # fmt: skip
        scores = masked_scores(model, batches, device)
        return scores["loss"], int(scores["targets"])
