"""GGUF export (lmpipe.deploy.gguf_export): the file loads back with transformers' own GGUF
reader, with the source model's logits (tight for F16, loose for Q8_0) and tokenizer; bad
input fails with a message that says what the exporter maps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertForMaskedLM

from lmpipe.deploy.gguf_export import (
    GGML_TYPES,
    GgufExportError,
    export_gguf,
    serving_chat_template,
    unsupported,
)
from lmpipe.runs.config import GGUF_TYPES, ConfigError, validate
from lmpipe.training.model import load_classifier, save_model

TEXT = "What is AI? The study of thinking machines."


@pytest.fixture
def saved(tmp_path: Path, tiny_model, tiny_tokenizer) -> Path:
    model_dir = tmp_path / "model"
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights of a trained model's scale: logits worth comparing
        for param in tiny_model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    save_model(tiny_model, tiny_tokenizer, model_dir)
    return model_dir


@pytest.mark.parametrize(("kind", "tolerance"), [("F16", 2e-3), ("Q8_0", 3e-2)])
def test_the_gguf_file_loads_back_with_the_source_models_logits_and_tokenizer(
    saved: Path, tmp_path: Path, tiny_tokenizer, kind: str, tolerance: float
) -> None:
    out = export_gguf(saved, tmp_path / "gguf" / f"model-{kind}.gguf", kind)
    source = AutoModelForCausalLM.from_pretrained(saved).eval()
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
    ids = tiny_tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got = source(ids).logits, loaded(ids).logits
    assert float((expected - got).norm() / expected.norm()) < tolerance
    if kind == "F16":
        assert torch.equal(expected.argmax(-1), got.argmax(-1))
    if (
        Version(transformers.__version__) <= Version("5.17.0")
        and tiny_tokenizer.bos_token_id is None
    ):
        # 5.17's GGUF tokenizer reader takes bos_token_id for the eos token, which a file of a
        # tokenizer without BOS (ours) lacks: an AttributeError (llama.cpp reads it fine).
        pytest.skip("transformers 5.17 cannot read a GGUF tokenizer without a BOS token")
    tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert tokenizer(TEXT)["input_ids"] == ids[0].tolist()
    assert tokenizer.chat_template == serving_chat_template(tiny_tokenizer.chat_template)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_below_8_bits_the_output_head_stays_at_8_and_the_blocks_take_the_type(
    saved: Path, tmp_path: Path, kind: str
) -> None:
    import gguf

    reader = gguf.GGUFReader(export_gguf(saved, tmp_path / f"m-{kind}.gguf", kind))
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0  # tied: the head
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType[kind]
    file_type = reader.fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == gguf.LlamaFileType[f"MOSTLY_{kind}"]


def test_q8_0_is_smaller_than_f16_and_f16_than_fp32(saved: Path, tmp_path: Path) -> None:
    sizes = {kind: export_gguf(saved, tmp_path / f"m-{kind}.gguf", kind).stat().st_size
             for kind in ("F16", "Q8_0")}  # fmt: skip
    fp32 = sum(p.stat().st_size for p in saved.glob("*.safetensors"))
    assert sizes["Q8_0"] < sizes["F16"] < fp32


def test_an_encoder_and_a_classifier_head_fail_naming_what_the_exporter_maps(
    tmp_path: Path, saved: Path, tiny_tokenizer
) -> None:
    bert = tmp_path / "bert"
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)  # fmt: skip
    BertForMaskedLM(config).save_pretrained(bert)
    with pytest.raises(GgufExportError, match=r"a bert model \(BertForMaskedLM\).*Llama"):
        export_gguf(bert, tmp_path / "bert.gguf")
    classifier = tmp_path / "classifier"
    save_model(load_classifier(saved, ["a", "b"]), tiny_tokenizer, classifier)
    assert "LlamaForSequenceClassification has a task head" in unsupported(classifier)
    with pytest.raises(GgufExportError, match="LlamaForSequenceClassification"):
        export_gguf(classifier, tmp_path / "classifier.gguf")
    assert not (tmp_path / "classifier.gguf").exists()
    with pytest.raises(GgufExportError, match="Q3_K"):
        export_gguf(saved, tmp_path / "x.gguf", "Q3_K")


def test_a_pre_tokenizer_llama_cpp_knows_by_another_regex_is_refused(
    saved: Path, tmp_path: Path
) -> None:
    from tokenizers import pre_tokenizers

    from lmpipe.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(saved)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel()]
    )
    tokenizer.save_pretrained(saved)
    with pytest.raises(GgufExportError, match=r"pre-tokenizer.*Digits.*GPT-2's split regex"):
        export_gguf(saved, tmp_path / "digits.gguf")


def test_the_config_names_the_gguf_types_the_exporter_writes() -> None:
    assert set(GGUF_TYPES) == set(GGML_TYPES)
    with pytest.raises(ConfigError, match=r"deploy\.gguf.*'Q3_K'"):
        validate({"deploy": {"gguf": ["F16", "Q3_K"]}})
