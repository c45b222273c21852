"""The training stages after SFT: DPO, KTO and GRPO, each through TRL's own trainer on the same 4-bit base.

A stage starts from the bare base or from an earlier adapter (`model.adapter`: a run's adapter folder or a registry
URI). Started from an adapter, the model handed to TRL is the base with that adapter, trainable; TRL then adds a
frozen copy of it as the peft adapter named "ref" and computes the reference log-probabilities with that adapter
active (trl 1.16: DPOTrainer/KTOTrainer/GRPOTrainer `__init__`, "ref" adapter) — so the reference policy is the
model the stage starts from, held by the same 4-bit base, not a second copy of the base and not the bare base.
Started from the base, LoRA is applied from `lora` and the reference is the base with the adapter disabled (which
is then the starting model). After training the "ref" copy stays for the evaluation, whose "before" it is
(`starting_policy`); the saved adapter is the trained one alone.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline_config.schema import PipelineConfig
from pipeline_config.stages import METHOD_DATA_FORMATS
from qlora.errors import PipelineInputError

REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of the starting adapter
STAGE_TAG = "qlora.stage"


@dataclass
class StartingAdapter:
    """The adapter a stage starts from, resolved once: a registry alias is pinned to its version when the run
    starts, so the lineage names the version trained from even if the alias moves meanwhile."""

    path: str  # a local adapter folder (a registry version's is downloaded into a folder of this run's own)
    spec: str  # as configured (`model.adapter`)
    model_name: str | None = None  # the registered model, for a registry URI
    version: str | None = None
    run_id: str | None = None  # the MLflow run that trained it (a registry version's)

    def lineage_tags(self) -> dict[str, str]:
        """Tags of the stage's MLflow run and registered version: where it started."""
        tags = {"parent_adapter": self.spec}
        if self.model_name:
            tags |= {"parent_model": self.model_name, "parent_version": self.version or ""}
        if self.run_id:
            tags["parent_run_id"] = self.run_id
        return tags


def _adapter_base_problem(folder: Path, cfg: PipelineConfig, spec: str) -> str | None:
    """The starting adapter was trained on another base than this run's model."""
    from pipeline_config.loading import load_pipeline_config
    from qlora.save import RESOLVED_CONFIG_NAME

    resolved = folder / RESOLVED_CONFIG_NAME
    if not resolved.is_file():
        return None  # an adapter from elsewhere: peft checks the module names when it loads
    theirs = load_pipeline_config(resolved).model
    if (theirs.name_or_path, theirs.gguf_file) != (cfg.model.name_or_path, cfg.model.gguf_file):
        return (
            f"model.adapter {spec} was trained on {theirs.name_or_path}"
            f"{' ' + theirs.gguf_file if theirs.gguf_file else ''}, not on this run's model.name_or_path "
            f"{cfg.model.name_or_path}: start from an adapter of the same base"
        )
    return None


def resolve_starting_adapter(cfg: PipelineConfig) -> StartingAdapter | None:
    """`model.adapter` as a local folder (a registry version downloaded into a temporary folder of this run's own).
    Raises PipelineInputError naming the field when it is not an adapter of this run's base."""
    spec = cfg.model.adapter
    if not spec:
        return None
    from qlora.inference import is_model_uri

    if is_model_uri(spec):
        from qlora.services import resolve_tracking_uri

        starting = _download_registered_adapter(spec, resolve_tracking_uri(cfg.tracking))
    else:
        folder = Path(spec)
        if not (folder / "adapter_config.json").is_file():
            what = "has no adapter_config.json" if folder.is_dir() else "does not exist"
            raise PipelineInputError(
                f"model.adapter {spec} {what}: give a run's adapter folder (outputs/<run>/adapter) or a registry URI "
                "(models:/NAME@champion, models:/NAME/VERSION)"
            )
        starting = StartingAdapter(path=str(folder.resolve()), spec=spec)
    if problem := _adapter_base_problem(Path(starting.path), cfg, spec):
        raise PipelineInputError(problem)
    return starting


def _download_registered_adapter(uri: str, tracking_uri: str) -> StartingAdapter:
    """The registered version `uri` names (an alias resolved to its version now), downloaded from the run's own
    tracking server. The flow opens its MLflow run (qlora/tracking.py, which sets the same tracking URI) only
    later; a `models:/` download reads the registry from MLflow's global URI, so it is set to the run's here."""
    import re

    import mlflow
    from mlflow.exceptions import MlflowException

    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
    if match is None:
        raise PipelineInputError(
            f"model.adapter {uri}: a stage starts from a registered adapter (models:/NAME@ALIAS or "
            "models:/NAME/VERSION) or an adapter folder"
        )
    name, alias, version = match.groups()
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise PipelineInputError(
            f"model.adapter {uri}: {exc.message.splitlines()[0]} in {tracking_uri} (tracking.tracking_uri)"
        ) from None
    version = str(found.version)
    target = Path(tempfile.mkdtemp(prefix="qlora-start-"))  # this run's own; never shared with another run
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}", dst_path=str(target), tracking_uri=tracking_uri
            )
        )
    except MlflowException as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise PipelineInputError(f"model.adapter {uri}: {exc.message.splitlines()[0]}") from None
    adapter = local / "artifacts" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise PipelineInputError(f"model.adapter {uri}: version {version} of {name} is not a QLoRA adapter model")
    return StartingAdapter(path=str(adapter), spec=uri, model_name=name, version=version, run_id=found.run_id)


def stage_input_problems(cfg: PipelineConfig, data, source=None) -> list[str]:
    """What a stage cannot train on: data of another format, rewards that cannot be built or read missing columns."""
    method = cfg.training.method
    problems = []
    formats = METHOD_DATA_FORMATS[method]
    if data.kind not in formats:
        problems.append(
            f"training.method {method} trains on {' or '.join(formats)} rows, but {data.source} has {data.kind!r} "
            "rows: set data.format / data.columns, or another training.method"
        )
    if method == "grpo" and not problems:
        from qlora.rewards import reward_problems

        problems += reward_problems(cfg.grpo.rewards, data.train.column_names)
    if method == "dpo" and cfg.preference.policy_rejected is not None and not problems:
        from qlora.rewards import reward_problems

        # the policy's answers are scored against each row's chosen answer, which reaches the reward as `answer`
        columns = [*data.train.column_names, "answer"]
        reward = cfg.preference.policy_rejected.reward
        problems += reward_problems([reward], columns, "preference.policy_rejected.reward")
    if method == "kto" and not problems:
        labels = set(data.train["label"])
        if len(labels) < 2:
            problems.append(
                f"KTO needs rows labelled desirable and undesirable; every training row of {data.source} is "
                f"{'desirable' if True in labels else 'undesirable'}"
            )
    return problems


def next_stage_problems(cfg: PipelineConfig) -> list[str]:
    """`registry.next_stages` that could not run on this run's champion: a missing or invalid config, or one of
    another base model (the stage would start from an adapter of the wrong base)."""
    from pipeline_config.loading import ConfigError, load_pipeline_config

    problems = []
    for path in cfg.registry.next_stages:
        if not Path(path).is_file():
            problems.append(f"registry.next_stages: {path} not found (relative to the working folder)")
            continue
        try:
            stage = load_pipeline_config(path)
        except ConfigError as exc:
            problems.append(f"registry.next_stages: {path} is not a valid config: {exc}")
            continue
        if (stage.model.name_or_path, stage.model.gguf_file) != (cfg.model.name_or_path, cfg.model.gguf_file):
            problems.append(
                f"registry.next_stages: {path} trains {stage.model.name_or_path}, not this run's "
                f"{cfg.model.name_or_path}: a stage starts from this run's adapter, so it needs the same base"
            )
    return problems


def stage_model(model, starting: StartingAdapter | None):
    """The model handed to TRL: the base with the starting adapter, trainable (TRL adds the frozen "ref" copy), or
    the base alone (TRL applies LoRA from the run's `peft_config`)."""
    if starting is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, starting.path, is_trainable=True)


def build_stage_trainer(
    method: str,
    model,
    data,
    tokenizer,
    cfg: PipelineConfig,
    args: dict,
    peft_config,
    callbacks: list,
):
    """TRL's trainer of `method` (with the project's atomic checkpoints), configured from `cfg` and the shared
    TrainingArguments `args`. `peft_config` None: `model` already carries the (starting) adapter."""
    from trl import DPOConfig, GRPOConfig, KTOConfig

    from qlora.integrations.trainer import PipelineDPOTrainer, PipelineGRPOTrainer, PipelineKTOTrainer, use_one_gpu

    common = dict(model=model, train_dataset=data.train, processing_class=tokenizer, callbacks=callbacks)
    if peft_config is not None:
        common["peft_config"] = peft_config
    pref = cfg.preference
    loss = {}
    if pref.loss_type and method == "dpo":
        loss["loss_type"] = pref.loss_type if isinstance(pref.loss_type, list) else [pref.loss_type]
        if pref.loss_weights:
            loss["loss_weights"] = pref.loss_weights
    elif pref.loss_type:
        loss["loss_type"] = pref.loss_type
    if method == "dpo":
        config = DPOConfig(**args, beta=pref.beta, **loss)
        trainer_class = PipelineDPOTrainer
    elif method == "kto":
        # KTO's KL term pairs each row with its neighbours of a fixed-order batch (TRL requires 'sequential'): the
        # rows are shuffled once, with the run's seed, instead of per epoch.
        common["train_dataset"] = data.train.shuffle(seed=args["seed"])
        config = KTOConfig(
            **(args | {"train_sampling_strategy": "sequential"}),
            beta=pref.beta,
            desirable_weight=pref.desirable_weight,
            undesirable_weight=pref.undesirable_weight,
            **loss,
        )
        trainer_class = PipelineKTOTrainer
    elif method == "grpo":
        from qlora.rewards import build_reward

        g = cfg.grpo
        grpo_args = {k: v for k, v in args.items() if k != "max_length"}  # GRPO: max_completion_length instead
        config = GRPOConfig(
            **grpo_args,
            num_generations=g.num_generations,
            max_completion_length=g.max_completion_length,
            temperature=g.temperature,
            beta=g.beta,
            reward_weights=[r.weight for r in g.rewards],
        )
        common["reward_funcs"] = [build_reward(r) for r in g.rewards]
        trainer_class = PipelineGRPOTrainer
    else:
        raise ValueError(f"no stage trainer for training.method {method!r}")
    use_one_gpu(config)
    trainer = trainer_class(args=config, **common)
    match_reference_dtype(trainer.model)
    return trainer


def match_reference_dtype(model) -> None:
    """Give the frozen "ref" copy the dtype of the adapter it copies. TRL (1.16) copies the starting adapter and then
    casts the trainable one to bf16 for a quantized model, leaving the copy in fp32: the reference would then not be
    the policy it starts as (DPO margins of -0.02 at a learning rate of 0, measured on the tiny test model)."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config or REFERENCE_ADAPTER not in peft_config:
        return
    dtypes = {n: p.dtype for n, p in model.named_parameters() if ".default." in n}
    for name, param in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            twin = dtypes.get(name.replace(f".{REFERENCE_ADAPTER}.", ".default."))
            if twin is not None and param.dtype != twin:
                param.data = param.data.to(twin)


@contextlib.contextmanager
def starting_policy(model) -> Iterator[None]:
    """The model as the run started: for a stage from an earlier adapter, that adapter (kept as "ref"); otherwise
    the base with the adapter disabled. What evaluation compares the trained model with."""
    peft_config = getattr(model, "peft_config", None) or {}
    if REFERENCE_ADAPTER not in peft_config:
        with model.disable_adapter():
            yield
        return
    active = model.active_adapter
    model.set_adapter(REFERENCE_ADAPTER)
    try:
        yield
    finally:
        model.set_adapter(active)


def load_starting_adapter(model, starting: StartingAdapter | None) -> None:
    """Put the starting adapter back beside a trained one loaded from the run folder (a re-run after training had
    finished), as "ref", in the trained adapter's dtype."""
    if starting is None or REFERENCE_ADAPTER in (getattr(model, "peft_config", None) or {}):
        return
    model.load_adapter(starting.path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    match_reference_dtype(model)
