"""Masked-LM pretraining and BERT encoders: the masking, the objective in the shared loop,
exact resume, and a local encoder as `model.init_from`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

from lmpipe.data.batches import IGNORE_INDEX
from lmpipe.data.tokenizer import document_frame, load_tokenizer, train_tokenizer
from lmpipe.runs.config import (
    HardwareConfig,
    MaskingConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
)
from lmpipe.taskdata import labelled
from lmpipe.tasks.masked_lm import MaskedLM, Vocabulary, mask_generator, mask_tokens
from lmpipe.training.checkpoint import Checkpoints
from lmpipe.training.loop import seed_everything, train
from lmpipe.training.model import build_model, load_classifier, save_model
from tests.conftest import PROSE
from tests.test_train import NullLogger

CPU = torch.device("cpu")
TEXTS = [PROSE, "The quick brown fox jumps over the lazy dog near the river bank."] * 40


@pytest.fixture(scope="module")
def encoder_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("encoder-tok")
    train_tokenizer(TEXTS, vocab_size=400, encoder=True).save_pretrained(path)
    return load_tokenizer(path)


def encoder_config(**changes) -> ModelConfig:
    settings = {"preset": "test", "family": "encoder", "hidden_size": 32, "num_layers": 2,
                "num_heads": 2, "intermediate_size": 64, "max_seq_len": 64}  # fmt: skip
    return ModelConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def stream(encoder_tokenizer) -> np.ndarray:
    """The corpus as tokenize writes it for an encoder: [CLS] doc [SEP] ..."""
    before, after = document_frame(encoder_tokenizer)
    ids = encoder_tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    return np.concatenate([np.asarray(before + doc + after) for doc in ids]).astype(np.int64)


def test_encoder_tokenizer_frames_texts_and_keeps_the_shared_ids(encoder_tokenizer) -> None:
    decoder = train_tokenizer(TEXTS, vocab_size=400)
    for token in ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"):
        assert encoder_tokenizer.convert_tokens_to_ids(token) == decoder.convert_tokens_to_ids(
            token
        )
    ids = encoder_tokenizer("the fox")["input_ids"]
    assert ids[0] == encoder_tokenizer.cls_token_id and ids[-1] == encoder_tokenizer.sep_token_id
    assert encoder_tokenizer.mask_token == "<|mask|>"
    assert document_frame(decoder) == ([], [decoder.eos_token_id])


def test_masking_follows_the_recipe_on_a_large_batch(encoder_tokenizer, stream) -> None:
    vocabulary = Vocabulary.of(encoder_tokenizer)
    ids = torch.from_numpy(np.resize(stream, (256, 64)).copy())
    inputs, labels = mask_tokens(ids, vocabulary, MaskingConfig(), mask_generator(3, 0))
    special = ~vocabulary.maskable[ids]
    targets = labels != IGNORE_INDEX
    assert special.any() and not (targets & special).any()  # special tokens never masked
    assert torch.equal(labels[targets], ids[targets])  # labels: the original tokens
    assert (labels[~targets] == IGNORE_INDEX).all() and torch.equal(inputs[~targets], ids[~targets])
    assert targets.sum() / (~special).sum() == pytest.approx(0.15, abs=0.01)
    masked = inputs[targets] == vocabulary.mask_id
    kept = inputs[targets] == ids[targets]
    replaced = ~masked & ~kept
    n = targets.sum()
    assert masked.sum() / n == pytest.approx(0.8, abs=0.02)
    # A random replacement can draw the original token: "kept" is 10% plus that small share.
    assert replaced.sum() / n == pytest.approx(0.1, abs=0.015)
    assert kept.sum() / n == pytest.approx(0.1, abs=0.015)
    assert vocabulary.maskable[inputs[targets][replaced]].all()  # random tokens: never special


def test_masking_matches_transformers_collator_in_distribution(encoder_tokenizer, stream) -> None:
    """The reference: transformers' DataCollatorForLanguageModeling, same 15% and 80/10/10."""
    ids = torch.from_numpy(np.resize(stream, (256, 64)).copy())
    torch.manual_seed(0)
    collator = DataCollatorForLanguageModeling(encoder_tokenizer, mlm_probability=0.15)
    reference = collator.torch_mask_tokens(ids.clone())
    ours = mask_tokens(ids, Vocabulary.of(encoder_tokenizer), MaskingConfig(), mask_generator(0, 0))
    for inputs, labels in (reference, ours):
        targets = labels != IGNORE_INDEX
        share = float(targets.sum()) / ids.numel()
        mask_share = float((inputs[targets] == encoder_tokenizer.mask_token_id).float().mean())
        assert (share, mask_share) == pytest.approx((reference_share(reference, ids), 0.8),
                                                    abs=0.02)  # fmt: skip


def reference_share(reference: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor) -> float:
    return float((reference[1] != IGNORE_INDEX).sum()) / ids.numel()


def test_masks_are_a_pure_function_of_seed_and_batch_index(encoder_tokenizer, stream) -> None:
    vocabulary = Vocabulary.of(encoder_tokenizer)
    ids = torch.from_numpy(np.resize(stream, (8, 64)).copy())

    def masks(seed: int, index: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return mask_tokens(ids, vocabulary, MaskingConfig(), mask_generator(seed, index, rank))

    first = masks(1, 5)
    torch.rand(100)  # the global generator plays no part
    assert all(torch.equal(a, b) for a, b in zip(first, masks(1, 5), strict=True))
    for other in (masks(1, 6), masks(2, 5), masks(1, 5, rank=1)):
        assert not torch.equal(first[1], other[1])


def test_whole_word_masking_masks_every_piece_of_a_word(encoder_tokenizer) -> None:
    vocabulary = Vocabulary.of(encoder_tokenizer)
    text = " ".join(["extraordinarily unbelievable circumstances"] * 60)
    ids = torch.tensor([encoder_tokenizer(text, add_special_tokens=False)["input_ids"][:120]])
    pieces = encoder_tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert len(pieces) > 3 * text[: len(pieces)].count(" ")  # words are split into pieces
    masking = MaskingConfig(probability=0.3, whole_word=True)
    _, labels = mask_tokens(ids, vocabulary, masking, mask_generator(0, 0))
    targets = (labels[0] != IGNORE_INDEX).tolist()
    words, current = [], []
    for piece, target in zip(pieces, targets, strict=True):
        if piece.startswith("Ġ") and current:
            words.append(current)
            current = []
        current.append(target)
    words.append(current)
    assert any(all(w) for w in words) and any(not any(w) for w in words)
    assert all(all(w) or not any(w) for w in words)  # never part of a word


def pretrain(tokenizer, stream, steps: int, checkpoints: Checkpoints | None = None,
             fail_at: int | None = None) -> torch.nn.Module:  # fmt: skip
    seed_everything(0)
    model = build_model(encoder_config(), tokenizer)
    p = PretrainConfig(steps=steps, batch_size=4, seq_len=32, eval_every=4, eval_batches=2,
                       checkpoint_every=3, log_every=1)  # fmt: skip
    task = MaskedLM(p.mlm, seed=0)
    setup = task.setup(p, model, tokenizer, stream, stream[:2048], 0, CPU)
    batches = setup.batches
    if fail_at is not None:
        real_next = type(batches).__next__

        class Dying(type(batches)):  # dies when it is asked for micro-batch `fail_at`
            def __next__(self):
                if self.position == fail_at:
                    raise KeyboardInterrupt
                return real_next(self)

        batches.__class__ = Dying
    logger = NullLogger()
    train(model, batches, p, HardwareConfig(), CPU, logger, setup.evaluate, checkpoints,
          objective=task)  # fmt: skip
    val = [row for row, _, series in logger.rows if series == "val"][-1]
    assert {"val_loss", "val_accuracy", "val_unigram_loss"} <= set(val)
    return model


def test_mlm_trains_in_the_shared_loop_and_resumes_bit_identically(
    encoder_tokenizer, stream, tmp_path: Path
) -> None:
    straight = pretrain(encoder_tokenizer, stream, steps=8)
    checkpoints = Checkpoints(tmp_path / "checkpoints", "fingerprint")
    with pytest.raises(KeyboardInterrupt):
        pretrain(encoder_tokenizer, stream, steps=8, checkpoints=checkpoints, fail_at=5)
    resumed = pretrain(encoder_tokenizer, stream, steps=8, checkpoints=checkpoints)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_mlm_beats_the_unigram_baseline(encoder_tokenizer, stream) -> None:
    p = PretrainConfig(steps=150, batch_size=8, seq_len=32, eval_batches=4,
                       optim=OptimConfig(lr=5e-3, warmup_steps=5))  # fmt: skip
    seed_everything(0)
    model = build_model(encoder_config(), encoder_tokenizer)
    task = MaskedLM(p.mlm, seed=0)
    setup = task.setup(p, model, encoder_tokenizer, stream, stream, 0, CPU)
    before = setup.evaluate(model)
    train(model, setup.batches, p, HardwareConfig(), CPU, NullLogger(), objective=task)
    after = setup.evaluate(model)
    assert after["loss"] < before["loss"] and after["loss"] < after["unigram_loss"]
    assert after["accuracy"] > before["accuracy"]
    assert after["unigram_loss"] == pytest.approx(
        task.baseline(p, encoder_tokenizer, stream, stream)["unigram_loss"], rel=1e-5
    )


def test_the_head_at_the_targets_only_gives_the_full_heads_loss_and_gradients(
    encoder_tokenizer, stream, tmp_path: Path
) -> None:
    """Training runs the vocabulary head at the targets only, through fixed target slots:
    the loss and every gradient equal the head at every position (BERT's own forward with
    labels); each batch has the same shape; the model saves and loads as a plain BERT."""
    import torch.nn.functional as F

    from lmpipe.tasks.masked_lm import target_slots

    p = PretrainConfig(batch_size=4, seq_len=32)
    seed_everything(0)
    model = build_model(encoder_config(), encoder_tokenizer)
    task = MaskedLM(p.mlm, seed=0)
    setup = task.setup(p, model, encoder_tokenizer, stream, stream[:2048], 0, CPU)
    model.eval()  # no dropout: the two passes see the same network
    batches = [next(setup.batches) for _ in range(3)]
    slots = target_slots(4 * 32, p.mlm)
    assert {b["target_positions"].shape for b in batches} == {(slots,)}
    for batch in batches:
        model.zero_grad()
        gathered = task.loss_sum(model, batch)
        gathered.backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
        labels = torch.full((4 * 32,), IGNORE_INDEX)
        count = task.target_count(batch)
        labels[batch["target_positions"][:count]] = batch["target_labels"][:count]
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"]).logits
        full = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=IGNORE_INDEX,
                               reduction="sum")  # fmt: skip
        full.backward()
        assert 0 < count == int((labels != IGNORE_INDEX).sum())
        torch.testing.assert_close(gathered, full, rtol=1e-5, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-4,
                                       atol=1e-6, msg=name)  # fmt: skip
    save_model(model, encoder_tokenizer, tmp_path / "saved")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "saved")
    assert type(loaded).__name__ == type(model).__name__ == "BertForMaskedLM"
    assert loaded.config.architectures == ["BertForMaskedLM"]


def test_a_batch_with_more_targets_than_slots_keeps_them_all() -> None:
    from lmpipe.tasks.masked_lm import SLOT_MULTIPLE, with_target_slots

    labels = torch.full((2, 100), IGNORE_INDEX)
    labels[:, ::2] = 7  # 100 targets
    batch = with_target_slots(torch.zeros(2, 100, dtype=torch.long), labels, slots=64)
    assert batch["target_positions"].shape == (2 * SLOT_MULTIPLE,)
    assert int((batch["target_labels"] == 7).sum()) == 100
    assert batch["target_positions"][:100].tolist() == list(range(0, 200, 2))


def test_a_local_encoder_directory_is_a_base(encoder_tokenizer, tmp_path: Path) -> None:
    """model.init_from=<dir>: a small BERT built and saved here loads for masked LM and as a
    classifier ([CLS] head), and its tokenizer is the one tokenize would use."""
    from lmpipe.data.tokenizer import base_tokenizer

    seed_everything(0)
    saved = build_model(encoder_config(), encoder_tokenizer)
    save_model(saved, encoder_tokenizer, tmp_path / "bert")
    assert type(AutoModelForMaskedLM.from_pretrained(tmp_path / "bert")).__name__ == (
        "BertForMaskedLM"
    )
    tokenizer = base_tokenizer(str(tmp_path / "bert"))
    assert tokenizer.mask_token_id == encoder_tokenizer.mask_token_id
    loaded = build_model(encoder_config(init_from=str(tmp_path / "bert")), tokenizer)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    classifier = load_classifier(tmp_path / "bert", ["a", "b"])
    assert type(classifier).__name__ == "BertForSequenceClassification"
    item = labelled.LabelledText("1", "the fox", "a")
    (example,) = labelled.encode_texts(tokenizer, [item], ["a", "b"], max_len=16)
    assert example["input_ids"][0] == tokenizer.cls_token_id
    assert example["input_ids"][-1] == tokenizer.sep_token_id
    assert AutoTokenizer.from_pretrained(tmp_path / "bert").cls_token == "<|cls|>"


def test_an_encoder_on_a_decoders_tokenizer_gets_the_tokens_it_needs(tiny_tokenizer) -> None:
    task = MaskedLM(MaskingConfig(), seed=0)
    tokenizer = task.prepare_tokenizer(AutoTokenizer.from_pretrained(
        tiny_tokenizer.name_or_path))  # fmt: skip
    assert tokenizer.mask_token_id is not None and tokenizer.cls_token_id is not None
    model = build_model(encoder_config(), tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == len(tiny_tokenizer) + 3
