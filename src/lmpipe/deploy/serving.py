"""The served model, logged with MLflow's models-from-code (nothing is pickled).

One class serves every task; the logged `model_config` says which, and the task's module
declares the rest (`FinetuningTask.serving`, `load`, `serve`):
  task: sft, preference  input: per row a `prompt` (one user turn) or chat `messages` (a
                         list of {role, content}), or a list of strings; output: one reply
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

MESSAGES = "messages"  # the column of chat conversations a generating model also takes
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
            column = self.task.serving.input_column
            if model_input.empty or not {column, MESSAGES} & set(model_input.columns):
                raise bad_request(column)
            texts = [chat_or_text(row, column) for row in model_input.to_dict("records")]
        else:
            texts = [str(t) for t in model_input]
        settings = {**DEFAULT_PARAMS, **(params or {})}
        return self.task.serve(self.model, self.tokenizer, texts, settings)


def chat_or_text(row: dict[str, Any], column: str) -> str | list[dict[str, str]]:
    """A request row's input: its chat `messages` where it has them, else its `column`; a
    row with neither is a bad request (MLflow answers 400)."""
    messages = row.get(MESSAGES)
    if messages is not None and len(messages):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    text = row.get(column)
    if text is None or (isinstance(text, float) and text != text):  # missing, or NaN
        raise bad_request(column)
    return str(text)


def bad_request(column: str) -> Exception:
    """What MLflow's scoring server answers with a 400: a row with no input."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(f"each row needs `{column}` or `{MESSAGES}`",
                           error_code=INVALID_PARAMETER_VALUE)  # fmt: skip


mlflow.models.set_model(ServedModel())
