"""The methods added since the last GPU review, on the GPU (the GPU check:
scripts/gpu_check.sh), each a check that can fail:

- pretraining on real tokens (the shipped corpus, outputs/tokenize) ends below the unigram
  loss, bf16 and compiled;
- masked LM: its head at the targets gives the full head's loss; it trains below unigram;
- DPO: the reference's log-probs equal the policy's at step 0 in bf16;
- AdaLoRA: an interrupted run resumes to the uninterrupted run's weights;
- LoRA: the merged model computes what the adapted one does;
- selection scoring: the GPU's scores (TF32) are the CPU's within TF32's error, cached apart;
- structured pruning: calibrated on the GPU, the pruned model computes what the dense one
  with the pruned units zeroed does;
- int8 next to a GPU model: it is compared with the fp32 model on the CPU it runs on.

LMPIPE_GPU_CHECK_DEVICE=cpu runs them on the CPU: a dry run of their code only.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmpipe.runs.config import HardwareConfig, OptimConfig, PretrainConfig, QuantizeConfig
from lmpipe.training.loop import autocast, enable_tf32, seed_everything, train
from lmpipe.training.model import build_model
from tests.conftest import REPO
from tests.test_gpu import CUDA, needs_gpu, preset
from tests.test_train import NullLogger

pytestmark = [pytest.mark.gpu, needs_gpu]

BF16 = HardwareConfig(device=CUDA.type, precision="bf16", compile=True)
# The demo's tokenized corpus (make demo writes it; the GPU check carries it along).
TOKENIZE = REPO / "outputs" / "tokenize"


def shipped_corpus():
    from lmpipe.data.tokenizer import load_tokenizer
    from lmpipe.data.tokens import load_tokens

    if not (TOKENIZE / "tokens").is_dir():
        pytest.skip(f"needs the shipped corpus tokenized at {TOKENIZE} (make demo; the GPU "
                    "check carries outputs/tokenize)")  # fmt: skip
    tokens = TOKENIZE / "tokens"
    return (
        load_tokenizer(TOKENIZE / "tokenizer"),
        load_tokens(tokens, "train"),
        load_tokens(tokens, "val"),
    )


def val_rows(logger: NullLogger) -> list[dict]:
    return [row for row, _, series in logger.rows if series == "val"]


def test_pretraining_on_the_shipped_corpus_ends_below_the_unigram_loss() -> None:
    from lmpipe.tasks.causal_lm import CausalLM

    tokenizer, train_tokens, val_tokens = shipped_corpus()
    p = PretrainConfig(steps=200, batch_size=16, seq_len=256, eval_every=100, eval_batches=8,
                       log_every=10, optim=OptimConfig(lr=2e-3, warmup_steps=20))  # fmt: skip
    seed_everything(0)
    model = build_model(preset("tiny"), tokenizer)
    task = CausalLM()
    setup = task.setup(p, model, tokenizer, train_tokens, val_tokens, 0, CUDA)
    logger = NullLogger()
    train(model, setup.batches, p, BF16, CUDA, logger, setup.evaluate, objective=task)
    unigram = task.baseline(p, tokenizer, train_tokens, val_tokens)["unigram_entropy"]
    val = val_rows(logger)[-1]["val_loss"]
    print(f"shipped corpus, 200 steps bf16 compiled: val loss {val:.3f}, unigram {unigram:.3f}")
    assert val < unigram - 0.3, (val, unigram)


def test_masked_lm_trains_below_unigram_with_its_head_at_the_targets() -> None:
    import torch.nn.functional as F

    from lmpipe.data.batches import IGNORE_INDEX
    from lmpipe.tasks.masked_lm import MaskedLM

    tokenizer, train_tokens, val_tokens = shipped_corpus()
    # 400 steps: post-LN BERT leaves the unigram plateau late (200 steps on the CPU dry run
    # ended only 0.09 below it)
    steps = 400 if CUDA.type == "cuda" else 200
    p = PretrainConfig(steps=steps, batch_size=16, seq_len=256, eval_every=100, eval_batches=8,
                       log_every=10, optim=OptimConfig(lr=1e-3, warmup_steps=20))  # fmt: skip
    task = MaskedLM(p.mlm, seed=0)
    tokenizer = task.prepare_tokenizer(tokenizer)
    seed_everything(0)
    model = build_model(preset("bert-tiny"), tokenizer)
    setup = task.setup(p, model, tokenizer, train_tokens, val_tokens, 0, CUDA)
    # The head at the targets only gives the full head's loss, here, in bf16.
    batch = {k: v.to(CUDA) for k, v in next(setup.batches).items()}
    setup.model.to(CUDA).eval()
    with torch.no_grad(), autocast(CUDA, "bf16"):
        gathered = task.loss_sum(setup.model, batch)
        count = task.target_count(batch)
        labels = torch.full((batch["input_ids"].numel(),), IGNORE_INDEX, device=CUDA)
        labels[batch["target_positions"][:count]] = batch["target_labels"][:count]
        logits = setup.model(input_ids=batch["input_ids"]).logits.float()
        full = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=IGNORE_INDEX,
                               reduction="sum")  # fmt: skip
    torch.testing.assert_close(gathered, full, rtol=2e-2, atol=1e-2)
    setup.batches.position = 0
    logger = NullLogger()
    train(setup.model, setup.batches, p, BF16, CUDA, logger, setup.evaluate, objective=task)
    val = val_rows(logger)[-1]
    print(f"masked LM, {steps} steps bf16 compiled: val loss {val['val_loss']:.3f}, unigram "
          f"{val['val_unigram_loss']:.3f}, accuracy {val['val_accuracy']:.3f}")  # fmt: skip
    assert val["val_loss"] < val["val_unigram_loss"], val


@pytest.mark.parametrize("compiled", [False, True])
def test_dpo_reference_equals_the_policy_at_step_0_in_bf16(
    tiny_tokenizer, tmp_path: Path, compiled: bool
) -> None:
    """Compiled, the reference must be computed by the compiled model as the policy is
    (lmpipe.tasks.base.reference_by_split), or the two differ by bf16 kernel choices."""
    from lmpipe.training.pair_losses import TIE_MARGIN
    from tests.test_preference import step_0_gaps

    hardware = HardwareConfig(device=CUDA.type, precision="bf16", compile=compiled)
    gaps = step_0_gaps(tiny_tokenizer, tmp_path, CUDA, hardware, autocast(CUDA, "bf16"))
    print(
        f"DPO step 0 in bf16{' compiled' if compiled else ''}: largest |policy - reference| "
        f"{float(gaps.max()):.2e} over {len(gaps)} replies (tie: < {TIE_MARGIN})"
    )
    assert float(gaps.max()) < TIE_MARGIN


def worker_run(out: Path, *extra: str) -> dict:
    import json

    from tests import distributed_worker

    args = ["--batch-size", "4", "--steps", "6", "--objective", "preference", "--device",
            CUDA.type, *extra]  # fmt: skip
    try:
        distributed_worker.main([str(out), *args])
    except SystemExit as exit:  # CrashingLogger's end of a job killed mid-run
        assert "--crash-at" in extra, exit
        return {}
    result = json.loads((out / "result.json").read_text())
    result["weights"] = load_file(out / "weights.safetensors")
    return result


def test_adalora_resumes_on_the_gpu(tmp_path: Path) -> None:
    """Its sensitivity averages come back onto the GPU (they are read onto the CPU)."""
    straight = worker_run(tmp_path / "straight", "--peft", "adalora")
    checkpoints = str(tmp_path / "checkpoints")
    worker_run(tmp_path / "crashed", "--peft", "adalora", "--checkpoints", checkpoints,
               "--crash-at", "5")  # fmt: skip
    resumed = worker_run(tmp_path / "resumed", "--peft", "adalora", "--checkpoints", checkpoints)
    assert resumed["resumed_from"] == 4
    assert resumed["ranks"] == straight["ranks"]
    for name, tensor in straight["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], tensor, rtol=1e-4, atol=1e-5)


def test_lora_merged_computes_what_the_adapted_model_does(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    worker_run(tmp_path, "--peft", "lora")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").to(CUDA).eval()
    probe = torch.tensor([list(range(5, 29))], device=CUDA)
    with torch.no_grad():
        logits = merged(input_ids=probe).logits.cpu()
    adapted = load_file(tmp_path / "probe.safetensors")["logits"]  # on the GPU, adapters on
    torch.testing.assert_close(logits, adapted, rtol=1e-3, atol=1e-3)


def test_selection_scores_on_the_gpu_match_the_cpu_and_are_cached_apart(tmp_path: Path) -> None:
    from lmpipe.selection.scoring import ScoreCache
    from lmpipe.training.loop import device_numerics
    from tests.sharded_worker import scores_of

    enable_tf32(CUDA, "bf16")  # as a bf16 run scores: TF32 for its fp32 matmuls
    try:
        on_gpu, on_cpu = scores_of(CUDA), scores_of(torch.device("cpu"))
        numerics = device_numerics(CUDA)
    finally:
        torch.set_float32_matmul_precision("highest")
    for column in ("conditional_loss", "response_loss"):
        np.testing.assert_allclose(on_gpu[column], on_cpu[column], rtol=1e-2)
    cpu_numerics = device_numerics(torch.device("cpu"))
    base = tmp_path / "model"
    base.mkdir()
    (base / "weights").write_text("w")
    if CUDA.type == "cuda":
        assert (
            ScoreCache(tmp_path, base, numerics).path
            != ScoreCache(tmp_path, base, cpu_numerics).path
        )


def test_pruning_calibrated_on_the_gpu_equals_the_zeroed_dense_model(tiny_tokenizer) -> None:
    from lmpipe.deploy.prune import input_norms, prune_structured, zero_pruned_units

    seed_everything(0)
    model = build_model(preset("tiny"), tiny_tokenizer).to(CUDA).eval()
    tokens = torch.randint(
        3, len(tiny_tokenizer), (4, 64), generator=torch.Generator().manual_seed(1)
    )
    norms = input_norms(model, [{"input_ids": tokens[:2]}, {"input_ids": tokens[2:]}], CUDA)
    pruned, kept = prune_structured(model.cpu(), norms, mlp_ratio=0.25, head_ratio=0.25)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zero_pruned_units(zeroed, kept)
        expected = zeroed.to(CUDA)(input_ids=tokens.to(CUDA)).logits
        actual = pruned.to(CUDA)(input_ids=tokens.to(CUDA)).logits
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_int8_is_compared_with_fp32_on_the_cpu_beside_a_gpu_model(tiny_model) -> None:
    from lmpipe.deploy.variants import CPU_TWIN, quantization_changes, variant_models
    from lmpipe.evaluation.lm_metrics import eval_mode

    models = variant_models(lambda: copy.deepcopy(tiny_model), "finetuned", CUDA,
                            QuantizeConfig(variants=["int8"]))  # fmt: skip
    vocab = tiny_model.config.vocab_size
    probe = torch.randint(3, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = {}
    for label, model in models.items():
        device = next(model.parameters()).device
        with torch.no_grad(), eval_mode(model), autocast(device, "bf16"):
            out = model(input_ids=probe.to(device), labels=probe.to(device))
        losses[f"{label}_loss"] = float(out.loss)
    assert next(models["int8"].parameters()).device.type == "cpu"
    if CUDA.type == "cuda":
        assert CPU_TWIN in models
    change = quantization_changes(losses)["int8_loss_change"]
    on_cpu = losses.get(f"{CPU_TWIN}_loss", losses["finetuned_loss"])
    print(
        f"int8 beside the GPU model: fp32 GPU bf16 {losses['finetuned_loss']:.5f}, fp32 CPU "
        f"{on_cpu:.5f}, int8 CPU {losses['int8_loss']:.5f}, change {change:+.5f}"
    )
    assert change == pytest.approx(losses["int8_loss"] - on_cpu)
    assert abs(change) < 0.05
