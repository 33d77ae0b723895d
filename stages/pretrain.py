"""pretrain: token shards + tokenizer -> pretrained model (outputs/pretrain/model).

The objective follows the model family: a decoder learns next-token prediction, an
encoder masked-LM (lmpipe.tasks). Resumable: a run killed mid-training continues from
outputs/pretrain/checkpoints/last when started again with the same config (`dvc repro`
does that).
"""

import hydra
from omegaconf import DictConfig

from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.data.tokens import load_tokens
from lmpipe.evaluation.lm_metrics import perplexity
from lmpipe.runs.config import ConfigError
from lmpipe.stage import Stage, prepare_cli
from lmpipe.tasks.pretraining import pretraining_task
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
        task = pretraining_task(c.model.family, p, c.seed)
        tokenizer = task.prepare_tokenizer(tokenizer)
        model = build_model(c.model, tokenizer)
        setup = task.setup(p, model, tokenizer, train_tokens, val_tokens, c.seed, device,
                           env.rank, env.world_size)  # fmt: skip
        metrics = stage.metric_logger()
        result = train(
            model,
            setup.batches,
            p,
            c.hardware,
            device,
            metrics,
            setup.evaluate,
            checkpoints=stage.checkpoints,
            run_id=stage.run_id,
            env=env,
            desc=f"pretrain ({task.name})",
            objective=task,
        )
        metrics.close()
        save_model(model, tokenizer, stage.output("model"), env)
        baseline = task.baseline(p, tokenizer, train_tokens, val_tokens)
        summary = {
            **result.summary(),
            "val_perplexity": perplexity(result.val_loss),
            **baseline,
            "val_loss_vs_unigram": result.val_loss / next(iter(baseline.values())),
            "parameters": count_parameters(model),
        }
        stage.write_json("metrics.json", summary)
        stage.log_metrics(summary)
        return result.val_loss


if __name__ == "__main__":
    prepare_cli("pretrain", distributed=True)
    main()
