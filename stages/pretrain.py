"""pretrain: token shards + tokenizer -> causal LM checkpoint (outputs/pretrain/model)."""

import hydra
from omegaconf import DictConfig

from lmpipe.config import ConfigError
from lmpipe.data.batches import random_windows, sequential_windows
from lmpipe.data.tokens import load_tokens
from lmpipe.evaluate import mean_loss, perplexity, unigram_entropy
from lmpipe.model import build_model, count_parameters, save_model
from lmpipe.stage import Stage, prepare_cli
from lmpipe.tokenizer import load_tokenizer
from lmpipe.tracking import MetricLogger
from lmpipe.train import seed_everything, select_device, train


@hydra.main(version_base="1.3", config_path="..", config_name="params")
def main(cfg: DictConfig) -> None:
    with Stage("pretrain", cfg, upstream=("tokenize",)) as stage:
        c, p = stage.cfg, stage.cfg.pretrain
        if p.seq_len > c.model.max_seq_len:
            raise ConfigError(
                f"pretrain.seq_len={p.seq_len} exceeds model.max_seq_len={c.model.max_seq_len}"
            )
        generator = seed_everything(c.seed)
        device = select_device(c.hardware)
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

        metrics = MetricLogger(stage.run_id, csv_dir=stage.output("curves"))
        result = train(
            model,
            random_windows(train_tokens, p.batch_size, p.seq_len, generator),
            p,
            device,
            c.hardware,
            metrics,
            val_loss,
            desc="pretrain",
        )
        metrics.close()
        save_model(model, tokenizer, stage.output("model"))
        baseline = unigram_entropy(
            val_tokens[: (val_span // p.seq_len) * p.seq_len], len(tokenizer)
        )
        summary = {
            "train_loss": result.train_loss,
            "val_loss": result.val_loss,
            "val_perplexity": perplexity(result.val_loss),
            "unigram_entropy": baseline,
            "val_loss_vs_unigram": result.val_loss / baseline,
            "parameters": count_parameters(model),
            "tokens": result.tokens,
            "tokens_per_second": result.tokens_per_second,
            "seconds": result.seconds,
        }
        stage.write_json("metrics.json", summary)
        stage.log_metrics(summary)


if __name__ == "__main__":
    prepare_cli("pretrain")
    main()
