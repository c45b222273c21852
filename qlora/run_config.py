"""A run's config: the file with its `--set` overrides, and the run parameters that replace settings, settled in
one place (the flow's validate-config step; the CLI calls it too, to fail before Prefect starts), so that what
MLflow logs as the run's params is what the run did."""

from __future__ import annotations

from pipeline_config.loading import ConfigError, load_pipeline_config
from pipeline_config.schema import PipelineConfig


def settle_run_config(
    config: PipelineConfig | None,
    config_path: str | None,
    overrides: list[str] | None,
    data_source: str | None = None,
    resume: str | None = None,
    resume_dir: str | None = None,
    adapter: str | None = None,
) -> PipelineConfig:
    """`config` as given, else the file with its overrides; `data_source` replaces `data.source`, `resume`
    replaces `training.resume`, `adapter` replaces `model.adapter`. Raises ConfigError (every problem, each naming
    its field)."""
    if config is None:
        config = load_pipeline_config(config_path, overrides)
    replaced = {"data.source": data_source, "training.resume": resume, "model.adapter": adapter}
    settled = {key: value for key, value in replaced.items() if value}
    if settled:
        config = load_pipeline_config(config.model_dump(mode="json"), settled)
    if resume_dir and config.training.resume == "never":
        raise ConfigError([f"resume_dir {resume_dir} and resume 'never' contradict: give one of them"])
    if config.quantization.compute_dtype == "auto":
        # settled on this machine, so that MLflow's params, the fingerprint and the registered version say what ran
        import torch

        from qlora.model import settled_compute_dtype

        device = "cuda" if config.training.device != "cpu" and torch.cuda.is_available() else "cpu"
        dtype = settled_compute_dtype(config, device)
        config = load_pipeline_config(config.model_dump(mode="json"), {"quantization.compute_dtype": dtype})
    return config
