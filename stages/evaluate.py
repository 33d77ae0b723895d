"""evaluate: pretrained + fine-tuned models on held-out data -> outputs/evaluate/metrics.json.

Validation perplexity of both models on the tokenize val split, response-only loss on the
held-out (test) chat pairs, and generations for held-out prompts as an MLflow table.
"""

import hydra
import mlflow
from omegaconf import DictConfig

from lmpipe.data.batches import sequential_windows
from lmpipe.data.sft import encode_all, load_chatterbot, ordered_batches, split_conversations
from lmpipe.data.tokens import load_tokens
from lmpipe.evaluate import generate_replies, mean_loss, perplexity, unigram_entropy
from lmpipe.model import load_model
from lmpipe.stage import Stage, prepare_cli
from lmpipe.tokenizer import load_tokenizer
from lmpipe.train import seed_everything, select_device


@hydra.main(version_base="1.3", config_path="..", config_name="params")
def main(cfg: DictConfig) -> None:
    with Stage("evaluate", cfg, upstream=("tokenize", "pretrain", "finetune")) as stage:
        c, e, f = stage.cfg, stage.cfg.evaluate, stage.cfg.finetune
        seed_everything(c.seed)
        device = select_device(c.hardware)
        tokenizer = load_tokenizer(stage.input("finetune", "model"))
        val_tokens = load_tokens(stage.input("tokenize", "tokens"), "val")
        seq_len = c.pretrain.seq_len
        test = split_conversations(load_chatterbot(f.language), f.val_fraction, f.test_fraction)[
            "test"
        ]
        test_examples = encode_all(tokenizer, test, f.max_len)
        prompts = [conv.prompt for conv in test[: e.num_generations]]
        table = {
            "prompt": prompts,
            "reference": [conv.messages[1]["content"] for conv in test[: e.num_generations]],
        }

        metrics: dict[str, float] = {}
        for name in ("pretrain", "finetune"):
            label = "pretrained" if name == "pretrain" else "finetuned"
            model = load_model(stage.input(name, "model")).to(device)
            windows = sequential_windows(val_tokens, e.batch_size, seq_len, e.max_tokens)
            val_loss, val_count = mean_loss(model, windows, device)
            sft_loss, _ = mean_loss(
                model, ordered_batches(test_examples, e.batch_size, tokenizer.pad_token_id), device
            )
            metrics |= {
                f"{label}_val_loss": val_loss,
                f"{label}_val_perplexity": perplexity(val_loss),
                f"{label}_sft_test_loss": sft_loss,
                f"{label}_sft_test_perplexity": perplexity(sft_loss),
            }
            table[label] = generate_replies(
                model,
                tokenizer,
                prompts,
                e.max_new_tokens,
                e.do_sample,
                e.temperature,
                e.top_p,
                device,
            )
        metrics["val_tokens"] = val_count
        metrics["sft_test_examples"] = len(test_examples)
        metrics["unigram_entropy"] = unigram_entropy(
            val_tokens[: min(len(val_tokens), e.max_tokens) // seq_len * seq_len], len(tokenizer)
        )
        mlflow.log_table(table, artifact_file="generations.json")
        stage.write_json("metrics.json", metrics)
        stage.log_metrics(metrics)


if __name__ == "__main__":
    prepare_cli("evaluate")
    main()
