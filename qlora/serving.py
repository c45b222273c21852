"""The registered model as MLflow serves it: the 4-bit base + the run's LoRA adapter, answering prompts.

Format: an MLflow pyfunc model whose artifact is the adapter folder (LoRA safetensors, tokenizer with its chat
template, resolved config, checksums); the base weights are not copied. `load_context` re-loads the base with the
flow's own loader (qlora/model.py) and the run's quantization, so served numerics equal the evaluated ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from qlora.integrations.mlflow_pyfunc import SelfCheckingPythonModel


class QLoRAChatModel(SelfCheckingPythonModel):
    """Base model in 4-bit + the run's LoRA adapter; `predict` takes prompts and returns generated text."""

    # Input contract. `predict`'s type hints are what MLflow 3 records as the signature (log_model infers it from
    # them): MLflow supports list[...] of str/int/float/bool/bytes/datetime, dicts and lists of those, pydantic
    # models, and unions, which it records as Any and does not check. A prompt is a string or a chat, so the
    # hint is list[str | list[dict[str, str]]] (recorded: inputs [Any], outputs [string]). A list of strings
    # alone would turn chats away; a pydantic model would change the request's JSON. MLflow's own check of the
    # hint would refuse a bare string (not a list) and would read a DataFrame's first column whatever its name,
    # so it is switched off (the flag MLflow's ChatModel uses) and `normalize_prompts` checks the input instead:
    # a bad input raises MlflowException(INVALID_PARAMETER_VALUE), which the scoring server answers with a 400
    # and a message. With a type-hint signature the server reads only {"inputs": ...} (its dataframe_* request
    # formats are refused); a DataFrame with a `prompt` / `messages` column still works in-process.
    # (the base class in qlora/integrations/mlflow_pyfunc.py sets MLflow's private flag for that).

    def load_context(self, context) -> None:
        from transformers import AutoTokenizer

        from pipeline_config.schema import LoraAdapterConfig, ModelConfig, QuantizationConfig
        from qlora.model import load_quantized_model, load_trained_adapter, pick_device
        from qlora.model_source import ModelSource
        from qlora.save import verify_adapter_dir

        cfg = context.model_config
        adapter = Path(context.artifacts["adapter"])
        verify_adapter_dir(adapter, cfg.get("adapter_sha256"))
        base_model = ModelConfig(name_or_path=cfg["base_model"], revision=cfg.get("base_revision"))
        # The same numerics the run evaluated: the flow's loader with the run's quantization and kbit preparation,
        # and the adapter in the trained dtype.
        base = load_quantized_model(
            ModelSource(base_model, cfg["base_model"], "registered base model"),
            QuantizationConfig.model_validate(cfg["quantization"]),
            pick_device("auto"),
            upcast_base_to_fp32=cfg.get("upcast_base_to_fp32", LoraAdapterConfig().upcast_base_to_fp32),
        )
        self.model = load_trained_adapter(base, adapter, cfg["adapter_dtype"])
        self.tokenizer = AutoTokenizer.from_pretrained(adapter)
        self.max_new_tokens = int(cfg["max_new_tokens"])

    def predict(
        self, context, model_input: list[str | list[dict[str, str]]], params: dict[str, Any] | None = None
    ) -> list[str]:
        """One greedy answer per prompt (`model_input`: any form `normalize_prompts` accepts).

        Raises MlflowException (INVALID_PARAMETER_VALUE) for an input that is none of those forms."""
        from qlora.evaluate import greedy_answers

        prompts = normalize_prompts(model_input, has_chat_template=bool(self.tokenizer.chat_template))
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        return greedy_answers(self.model, self.tokenizer, prompts, max_new, batch_size=8)


def normalize_prompts(model_input, has_chat_template: bool) -> list:
    """A list of prompts, each a string or a chat (a list of {"role", "content"} turns), from: a string, one chat,
    a list of strings and/or chats, or a DataFrame with a `prompt` or `messages` column. Strings become a user turn
    when the tokenizer has a chat template.

    Raises MlflowException (INVALID_PARAMETER_VALUE, a 400 when served) naming what was wrong with the input."""
    forms = (
        "a prompt string, a chat (a list of {'role': str, 'content': str} turns), a list of prompt strings "
        "and/or chats, or a DataFrame with a 'prompt' or 'messages' column"
    )
    if hasattr(model_input, "columns"):  # pandas DataFrame (in-process predict, spark_udf)
        column = next((c for c in ("messages", "prompt") if c in model_input.columns), None)
        if column is None:
            raise MlflowException.invalid_parameter_value(
                f"Expected {forms}; got a DataFrame with columns {list(model_input.columns)}."
            )
        model_input = model_input[column].tolist()
    elif hasattr(model_input, "tolist"):  # numpy array or pandas Series
        model_input = model_input.tolist()
    if isinstance(model_input, str) or (
        isinstance(model_input, list) and model_input and isinstance(model_input[0], dict)
    ):
        model_input = [model_input]  # a single prompt
    if not isinstance(model_input, list):
        raise MlflowException.invalid_parameter_value(
            f"Expected {forms}; got {type(model_input).__name__}: {repr(model_input)[:100]}."
        )
    prompts: list = []
    for i, prompt in enumerate(model_input):
        if hasattr(prompt, "tolist"):  # a `messages` cell of a DataFrame may hold a numpy array of turns
            prompt = prompt.tolist()
        if isinstance(prompt, str):
            prompts.append([{"role": "user", "content": prompt}] if has_chat_template else prompt)
            continue
        is_chat = isinstance(prompt, list | tuple) and len(prompt) > 0
        is_chat = is_chat and all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in prompt
        )
        if not is_chat:
            raise MlflowException.invalid_parameter_value(
                f"Expected {forms}; prompt {i} is {type(prompt).__name__}: {repr(prompt)[:100]}."
            )
        if not has_chat_template:
            raise MlflowException.invalid_parameter_value(
                f"Prompt {i} is a chat, but this model's tokenizer has no chat template: send plain strings."
            )
        prompts.append([dict(t) for t in prompt])
    return prompts
