"""The served model, logged with MLflow's models-from-code (nothing is pickled).

One class serves every task; the logged `model_config` says which, and the task's module
declares the rest (`FinetuningTask.serving`, `load`, `serve`):
  task: sft, preference  input: a `prompt` column (or a list of strings); output: one reply
                         per row (params: max_new_tokens, min_new_tokens, do_sample,
                         temperature, top_p)
  task: classify         input: a `text` column; output: `label` and `confidence` per row
  quantize: <method>     rebuild that quantized variant at load time, on the CPU (lmpipe.
                         deploy.quantize: int8, int8-dynamic, or int4 with group_size and
                         symmetric)
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


class ServedModel(mlflow.pyfunc.PythonModel):
    """Loads the saved HF directory (model + tokenizer) logged as the `model` artifact."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from lmpipe.data.tokenizer import load_tokenizer
        from lmpipe.deploy.quantize import quantizer
        from lmpipe.tasks.finetuning import finetuning_task

        config = context.model_config or {}
        self.task = finetuning_task(config.get("task", "sft"))
        path = context.artifacts["model"]
        self.tokenizer = load_tokenizer(path)
        self.model = self.task.load(path).eval()
        if config.get("quantize"):
            make = quantizer(config["quantize"], int(config.get("group_size", 32)),
                             bool(config.get("symmetric", True)))  # fmt: skip
            self.model = make(self.model)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[str] | pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            texts = model_input[self.task.serving.input_column].astype(str).tolist()
        else:
            texts = [str(t) for t in model_input]
        settings = {**DEFAULT_PARAMS, **(params or {})}
        return self.task.serve(self.model, self.tokenizer, texts, settings)


mlflow.models.set_model(ServedModel())
