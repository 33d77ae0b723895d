"""finetune: pretrain checkpoint + chat pairs -> SFT model (outputs/finetune/model).

Early stopping on the validation loss; the best weights become the model. Resumable like
pretrain. Returns the best validation loss, the objective of a Hydra sweep.
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
from lmpipe.train import seed_everything, setup_hardware, train


@hydra.main(version_base="1.3", config_path="..", config_name="params")
def main(cfg: DictConfig) -> float:
    resume_keys = ("seed", "finetune")
    with Stage("finetune", cfg, upstream=("pretrain",), resume_keys=resume_keys) as stage:
        c, f = stage.cfg, stage.cfg.finetune
        device, env = setup_hardware(c.hardware)
        seed_everything(c.seed)
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

        metrics = stage.metric_logger()
        result = train(
            model,
            shuffled_batches(train_examples, f.batch_size, pad, c.seed, env.rank, env.world_size),
            f,
            c.hardware,
            device,
            metrics,
            val_loss,
            checkpoints=stage.checkpoints,
            run_id=stage.run_id,
            env=env,
            desc="finetune",
        )
        metrics.close()
        save_model(model, tokenizer, stage.output("model"), env)
        objective = result.best_val_loss if f.final_weights == "best" else result.val_loss
        summary = {
            **result.summary(),
            "val_perplexity": perplexity(objective),
            "train_examples": len(train_examples),
            "val_examples": len(val_examples),
        }
        stage.write_json("metrics.json", summary)
        stage.log_metrics(summary)
        return objective


if __name__ == "__main__":
    prepare_cli("finetune")
    main()
