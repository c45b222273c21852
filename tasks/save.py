"""Step 7: save the adapter (safetensors) with the tokenizer and the resolved config, atomically.

Everything is written into a temporary sibling folder first and renamed into place, so a crash or a full disk
never leaves a half-written adapter where a reader (or the registry) would pick it up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import PipelineConfig, dump_pipeline_config

ADAPTER_DIRNAME = "adapter"
RESOLVED_CONFIG_NAME = "pipeline_config.yaml"


def save_adapter(peft_model, tokenizer, cfg: PipelineConfig) -> Path:
    """Write adapter weights, tokenizer and resolved config to `<output_dir>/adapter`; returns that folder."""
    out_dir = Path(cfg.training.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / ADAPTER_DIRNAME
    tmp = Path(tempfile.mkdtemp(prefix=f".{ADAPTER_DIRNAME}.tmp-", dir=out_dir))
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / RESOLVED_CONFIG_NAME).write_text(dump_pipeline_config(cfg))
        if final.exists():
            old = out_dir / f".{ADAPTER_DIRNAME}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@task(name="save-adapter", cache_policy=NO_CACHE, persist_result=False)
def save_adapter_task(peft_model, tokenizer, cfg: PipelineConfig) -> str:
    return str(save_adapter(peft_model, tokenizer, cfg))
