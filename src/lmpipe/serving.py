"""The served model, logged with MLflow's models-from-code (nothing is pickled).

Input: a DataFrame with a `prompt` column (or a list of strings); output: one reply per row.
Optional inference params: max_new_tokens, do_sample, temperature, top_p.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd

DEFAULT_PARAMS: dict[str, Any] = {
    "max_new_tokens": 32,
    "do_sample": False,
    "temperature": 1.0,
    "top_p": 1.0,
}


class ChatModel(mlflow.pyfunc.PythonModel):
    """Loads the saved HF directory (model + tokenizer) logged as the `model` artifact."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from lmpipe.model import load_model
        from lmpipe.tokenizer import load_tokenizer

        path = context.artifacts["model"]
        self.tokenizer = load_tokenizer(path)
        self.model = load_model(path)
        self.model.eval()

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[str]:
        from lmpipe.evaluate import generate_replies

        settings = {**DEFAULT_PARAMS, **(params or {})}
        if isinstance(model_input, pd.DataFrame):
            prompts = model_input["prompt"].astype(str).tolist()
        else:
            prompts = [str(p) for p in model_input]
        return generate_replies(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=int(settings["max_new_tokens"]),
            do_sample=bool(settings["do_sample"]),
            temperature=float(settings["temperature"]),
            top_p=float(settings["top_p"]),
        )


mlflow.models.set_model(ChatModel())
