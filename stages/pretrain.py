"""pretrain: token shards + tokenizer -> causal LM checkpoint (outputs/pretrain/model).

Resumable: a run killed mid-training continues from outputs/pretrain/checkpoints/last
when started again with the same config (`dvc repro` does that).
"""

import hydra
from omegaconf import DictConfig

from lmpipe.data.batches import sequential_windows, window_batches
from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.data.tokens import load_tokens
from lmpipe.evaluation.lm_metrics import mean_loss, perplexity, unigram_entropy
from lmpipe.runs.config import ConfigError
from lmpipe.stage import Stage, prepare_cli
from lmpipe.training.loop import seed_everything, setup_hardware, train
from lmpipe.training.model import build_model, count_parameters, save_model


@hydra.main(version_base="1.3", config_path="..", config_name="params")
def main(cfg: DictConfig) -> float:
    resume_keys = ("seed", "model", "pretrain")
    with Stage("pretrain", cfg, upstream=("tokenize",), resume_keys=resume_keys) as stage:
        c, p = stage.cfg, stage.cfg.pretrain
        if p.seq_len > c.model.max_seq_len and not c.model.init_from:
            raise ConfigError(
                f"pretrain.seq_len={p.seq_len} exceeds model.max_seq_len={c.model.max_seq_len}"
            )
        device, env = setup_hardware(c.hardware)
        seed_everything(c.seed)
        tokenizer = load_tokenizer(stage.input("tokenize", "tokenizer"))
        tokens = stage.input("tokenize", "tokens")
        train_tokens, val_tokens = load_tokens(tokens, "train"), load_tokens(tokens, "val")
        model = build_model(c.model, tokenizer)
        # The periodic validation set: the first eval_batches windows of the val split.
        val_span = p.eval_batches * p.batch_size * p.seq_len

        def val_loss(m) -> float:
            return mean_loss(
                m, sequential_windows(val_tokens, p.batch_size, p.seq_len, val_span), device
            )[0]

        metrics = stage.metric_logger()
        result = train(
            model,
            window_batches(train_tokens, p.seq_len, p.batch_size, c.seed, env.rank, env.world_size),
            p,
            c.hardware,
            device,
            metrics,
            val_loss,
            checkpoints=stage.checkpoints,
            run_id=stage.run_id,
            env=env,
            desc="pretrain",
        )
        metrics.close()
        save_model(model, tokenizer, stage.output("model"), env)
        baseline = unigram_entropy(
            val_tokens[: (val_span // p.seq_len) * p.seq_len], len(tokenizer)
        )
        summary = {
            **result.summary(),
            "val_perplexity": perplexity(result.val_loss),
            "unigram_entropy": baseline,
            "val_loss_vs_unigram": result.val_loss / baseline,
            "parameters": count_parameters(model),
        }
        stage.write_json("metrics.json", summary)
        stage.log_metrics(summary)
        return result.val_loss


if __name__ == "__main__":
    prepare_cli("pretrain")
    main()
