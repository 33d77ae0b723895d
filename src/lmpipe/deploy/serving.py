"""The served model, logged with MLflow's models-from-code (nothing is pickled).

One class serves both tasks; the logged `model_config` says which:
  task: sft       input: a `prompt` column (or a list of strings); output: one reply per row
                  (params: max_new_tokens, min_new_tokens, do_sample, temperature, top_p)
  task: classify  input: a `text` column; output: `label` and `confidence` per row
  quantize: int8  rebuild the int8 dynamic-quantized variant at load time (CPU)
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd

DEFAULT_PARAMS: dict[str, Any] = {
    "max_new_tokens": 32,
    "min_new_tokens": 0,
    "do_sample": False,
    "temperature": 1.0,
    "top_p": 1.0,
}
INPUT_COLUMN = {"sft": "prompt", "classify": "text", "preference": "prompt"}


class ServedModel(mlflow.pyfunc.PythonModel):
    """Loads the saved HF directory (model + tokenizer) logged as the `model` artifact."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from lmpipe.data.tokenizer import load_tokenizer
        from lmpipe.deploy.quantize import quantize_int8
        from lmpipe.training.model import load_classifier, load_model

        config = context.model_config or {}
        self.task = config.get("task", "sft")
        path = context.artifacts["model"]
        self.tokenizer = load_tokenizer(path)
        self.model = (load_classifier if self.task == "classify" else load_model)(path).eval()
        if config.get("quantize") == "int8":
            self.model = quantize_int8(self.model)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[str] | pd.DataFrame:
        column = INPUT_COLUMN[self.task]
        if isinstance(model_input, pd.DataFrame):
            texts = model_input[column].astype(str).tolist()
        else:
            texts = [str(t) for t in model_input]
        if self.task == "classify":
            return self._classify(texts)
        from lmpipe.evaluation.scoring import generate_replies

        settings = {**DEFAULT_PARAMS, **(params or {})}
        return generate_replies(
            self.model,
            self.tokenizer,
            texts,
            max_new_tokens=int(settings["max_new_tokens"]),
            do_sample=bool(settings["do_sample"]),
            temperature=float(settings["temperature"]),
            top_p=float(settings["top_p"]),
            min_new_tokens=int(settings["min_new_tokens"]),
        )

    def _classify(self, texts: list[str]) -> pd.DataFrame:
        import torch

        labels, confidences = [], []
        for text in texts:  # one at a time: no padding, so the last token is the text's own
            ids = self.tokenizer(text or " ", add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                probs = self.model(input_ids=ids["input_ids"]).logits.float().softmax(-1)[0]
            best = int(probs.argmax())
            labels.append(self.model.config.id2label[best])
            confidences.append(float(probs[best]))
        return pd.DataFrame({"label": labels, "confidence": confidences})


mlflow.models.set_model(ServedModel())
