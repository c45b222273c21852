"""Step `save-adapter` (qlora/save.py): the adapter into the run folder, atomically; the folder is then finished."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import PipelineConfig
from qlora.run_folder import RunFolder
from qlora.save import save_adapter


@task(name="save-adapter", cache_policy=NO_CACHE, persist_result=False)
def save_adapter_task(peft_model, tokenizer, cfg: PipelineConfig, run_folder: RunFolder) -> str:
    return str(save_adapter(peft_model, tokenizer, cfg, run_folder.path))
