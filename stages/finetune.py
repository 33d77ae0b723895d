"""finetune: pretrain checkpoint + chat pairs -> SFT model (outputs/finetune/model).

Returns the final validation loss, the objective of a Hydra sweep.
"""

import hydra
from omegaconf import DictConfig

from lmpipe.config import ConfigError
from lmpipe.data.sft import (
    encode_all,
    load_chatterbot,
    ordered_batches,
    shuffled_batches,
    split_conversations,
)
from lmpipe.evaluate import mean_loss, perplexity
from lmpipe.model import load_model, save_model
from lmpipe.stage import Stage, prepare_cli
from lmpipe.tokenizer import load_tokenizer
from lmpipe.tracking import MetricLogger
from lmpipe.train import seed_everything, select_device, train


@hydra.main(version_base="1.3", config_path="..", config_name="params")
def main(cfg: DictConfig) -> float:
    with Stage("finetune", cfg, upstream=("pretrain",)) as stage:
        c, f = stage.cfg, stage.cfg.finetune
        generator = seed_everything(c.seed)
        device = select_device(c.hardware)
        base = stage.input("pretrain", "model")
        tokenizer, model = load_tokenizer(base), load_model(base)
        if f.max_len > model.config.max_position_embeddings:
            raise ConfigError(
                f"finetune.max_len={f.max_len} exceeds the base model's "
                f"max_position_embeddings={model.config.max_position_embeddings}"
            )
        splits = split_conversations(load_chatterbot(f.language), f.val_fraction, f.test_fraction)
        train_examples = encode_all(tokenizer, splits["train"], f.max_len)
        val_examples = encode_all(tokenizer, splits["val"], f.max_len)
        pad = tokenizer.pad_token_id

        def val_loss(m) -> float:
            return mean_loss(
                m, ordered_batches(val_examples, f.batch_size, pad), device, f.eval_batches
            )[0]

        metrics = MetricLogger(stage.run_id, csv_dir=stage.output("curves"))
        result = train(
            model,
            shuffled_batches(train_examples, f.batch_size, pad, generator),
            f,
            device,
            c.hardware,
            metrics,
            val_loss,
            desc="finetune",
        )
        metrics.close()
        save_model(model, tokenizer, stage.output("model"))
        summary = {
            "train_loss": result.train_loss,
            "val_loss": result.val_loss,
            "val_perplexity": perplexity(result.val_loss),
            "train_examples": len(train_examples),
            "val_examples": len(val_examples),
            "tokens": result.tokens,
            "tokens_per_second": result.tokens_per_second,
            "seconds": result.seconds,
        }
        stage.write_json("metrics.json", summary)
        stage.log_metrics(summary)
        return result.val_loss


if __name__ == "__main__":
    prepare_cli("finetune")
    main()
