"""Train the LoRA adapter with TRL's SFTTrainer, which applies LoRA to the 4-bit base (the one place that does).

The trainer gets the five things the original recipe passes: model, dataset, LoRA config, tokenizer and
training arguments. Recipe argument names are mapped onto the installed transformers (v5 folded
`warmup_ratio` into `warmup_steps` and replaced `group_by_length` with `train_sampling_strategy`).
Training loss per logging step reaches MLflow through transformers' own MLflowCallback (`report_to`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig

from pipeline_config.schema import LoraAdapterConfig, TrainingConfig
from qlora.chat_template import decide_assistant_only_loss, training_template_applied
from qlora.data import DatasetSplits
from qlora.errors import PipelineInputError
from qlora.files import atomic_folder, damaged_files, write_checksums, write_text_atomic
from qlora.integrations.attention import packed_training_attention, resolve_attention
from qlora.integrations.fused_lora import fuse_lora_layers
from qlora.integrations.regional_compile import compile_decoder_layers, uncompile_decoder_layers
from qlora.integrations.trainer import CheckpointFirstLayers, PipelineSFTTrainer, use_one_gpu
from qlora.model import build_lora_config, is_mixture_of_experts
from qlora.run_folder import TRAIN_RESULT_NAME, TRAINED_ADAPTER_DIRNAME, write_fingerprint
from qlora.stop import current as current_stop


@dataclass
class TrainResult:
    """The trained PEFT model (in memory) and what the run measured."""

    model: PreTrainedModel
    metrics: dict[str, float]
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    train_dataset: object = None  # the tokenized rows SFTTrainer trained on
    resumed_from: str | None = None  # checkpoint folder training continued from, if any
    adapter_dtype: str = "float32"  # dtype the trained LoRA weights are kept in (SFTTrainer: bf16 for QLoRA)
    # FSDP: the LoRA weights gathered from the shards (on rank 0; empty on the others), for `save_pretrained`
    adapter_state_dict: dict | None = None


class RunLoggerProgress(TrainerCallback):
    """Training progress (step, loss, learning rate, ETA) into `log` (the Prefect run log, from the task)."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter | None = None) -> None:
        self.log = log or logging.getLogger(__name__)
        self.started = time.perf_counter()
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        done = state.global_step - self.first_step
        elapsed = time.perf_counter() - self.started
        eta_s = elapsed / done * (state.max_steps - state.global_step) if done else float("nan")
        self.log.info(
            "step %d/%d loss %.4f lr %.3g elapsed %.0fs ETA %.0fs",
            state.global_step,
            state.max_steps,
            logs["loss"],
            logs.get("learning_rate", float("nan")),
            elapsed,
            eta_s,
        )


class StopAtNextStep(TrainerCallback):
    """Graceful stop (qlora/stop.py): once a stop is requested, training ends at the end of the current optimizer
    step, with a checkpoint of that step when the last checkpoint's write time fits in what is left of the grace
    period (the first one always tries: an interrupted write leaves nothing behind).

    Several processes must agree on both, or one would wait forever in a collective the others never join: every
    step they combine their requests in one all-reduce over a gloo group on the host (no GPU sync, ~0.1 ms)."""

    def __init__(self, stop, save_seconds) -> None:
        self.stop = stop
        self.save_seconds = save_seconds  # () -> seconds the last checkpoint took, None before the first
        self.group = None

    def on_train_begin(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")  # collective: every rank creates it here

    def _decision(self) -> tuple[bool, bool]:
        stop = self.stop
        last = self.save_seconds()
        fits = last is None or last < stop.seconds_left()
        requested, no_room = stop.requested, stop.requested and (stop.at_once or not fits)
        if self.group is not None:
            import torch.distributed as dist

            flags = torch.tensor([int(requested), int(no_room)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            requested, no_room = bool(flags[0]), bool(flags[1])
        return requested, not no_room

    def on_step_end(self, args, state, control, **kwargs):
        requested, save = self._decision()
        if requested:
            control.should_training_stop = True
            control.should_save = save
        return control


def use_liger_kernels(requested: bool | str, device: str) -> bool:
    """Resolve `training.liger_kernels`: 'auto' = on CUDA when liger-kernel is installed."""
    import importlib.util

    installed = importlib.util.find_spec("liger_kernel") is not None
    if requested == "auto":
        return device == "cuda" and installed
    if requested and not installed:
        raise PipelineInputError("training.liger_kernels is true but liger-kernel is not installed: pip install it")
    return bool(requested)


def liger_unsupported(config) -> str | None:
    """Why Liger's kernels would not train this family correctly (then it trains without them, and the run log says
    so), or None. Exact or off: a mixture-of-experts block goes through Liger's fused SwiGLU, which reads expert
    attributes that peft's wrapped expert parameters do not have (AttributeError 'hidden_dim' on Mixtral and
    Qwen3-MoE, a wrong-shaped evaluation on OLMoE, measured on an H200)."""
    if is_mixture_of_experts(config):
        return "Liger's kernels do not handle its mixture-of-experts blocks under peft"
    return None


def latest_complete_checkpoint(run_dir: str) -> str | None:
    """Newest `checkpoint-N` folder of a run folder (only complete ones exist, see PipelineSFTTrainer)."""
    return get_last_checkpoint(run_dir) if Path(run_dir).is_dir() else None


def fsdp_arguments(cfg: TrainingConfig, device: str) -> dict:
    """Training arguments for FSDP-QLoRA (`distributed.strategy: fsdp`), the path bitsandbytes' and peft's docs
    describe: FSDP1 through accelerate, one FSDP unit per decoder layer (the model's `_no_split_modules`; the
    Trainer adds peft's policy that gives the LoRA layers their own units, so frozen 4-bit and trainable weights
    never share a flat parameter), full sharding, FSDP's own activation checkpointing (the Trainer's would
    all-gather every layer once more in backward), and a full state dict gathered to rank 0 for saving.

    FSDP1, not FSDP2: accelerate's FSDP2 path keeps `Params4bit` weights out of CPU-RAM-efficient loading and
    leaves them unsharded whenever it can't shard them (accelerate#3983/#3987). `sync_module_states` (and the
    loading flag) need an accelerator device; on the CPU (tests) every rank loads the same weights anyway."""
    on_gpu = device == "cuda"
    return dict(
        fsdp=True,
        fsdp_config={
            "version": 1,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": "full_shard",
            "use_orig_params": False,
            "cpu_ram_efficient_loading": on_gpu,
            "sync_module_states": on_gpu,
            "activation_checkpointing": cfg.gradient_checkpointing,
            "state_dict_type": "FULL_STATE_DICT",
            "backward_prefetch": "BACKWARD_PRE",
            "limit_all_gathers": True,
        },
        gradient_checkpointing=False,
    )


def trainer_arguments(cfg: TrainingConfig, device: str, output_dir: str, report_to_mlflow: bool = False) -> dict:
    """The TrainingArguments every method's TRL config shares, from the recipe-named TrainingConfig."""
    return dict(
        output_dir=output_dir,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        gradient_checkpointing=cfg.gradient_checkpointing,
        # Non-reentrant checkpointing needs no input that requires grad and works with frozen 4-bit layers.
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_grad_norm=cfg.max_grad_norm,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a value below 1 is a fraction of the total steps
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        logging_steps=cfg.logging_steps,
        max_length=cfg.max_seq_length,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        seed=cfg.seed,
        use_cpu=device == "cpu",
        dataloader_pin_memory=device != "cpu",
        ddp_find_unused_parameters=False,  # DDP: every LoRA weight gets a gradient; no per-step search for unused ones
        eval_strategy="no",
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        report_to=["mlflow"] if report_to_mlflow else "none",
        disable_tqdm=not sys.stderr.isatty(),
    )


def build_sft_config(
    cfg: TrainingConfig,
    device: str,
    output_dir: str,
    report_to_mlflow: bool = False,
    fsdp: bool = False,
    assistant_only_loss: bool = False,
    **overrides,
) -> SFTConfig:
    """SFTConfig from the recipe-named TrainingConfig; checkpoints go to `output_dir` (the run folder). `fsdp`:
    shard the model across the processes (`fsdp_arguments`). `assistant_only_loss`: the resolved
    `training.assistant_only_loss` (qlora/chat_template.py). `overrides` replace single arguments (the bench: no
    saving, a log line per step)."""
    args = trainer_arguments(cfg, device, output_dir, report_to_mlflow) | dict(
        # compiled layers get inductor's fused norm/SwiGLU/RoPE: dynamo can't trace Liger's autograd Functions
        use_liger_kernel=use_liger_kernels(cfg.liger_kernels, device) and not cfg.compile_layers,
        packing=cfg.packing,
        include_num_input_tokens_seen="non_padding",
        # The NaN/inf filter of the logged loss reads every micro-batch's loss back to the host: off with the
        # device-side metrics (a NaN loss then shows in the log as NaN).
        logging_nan_inf_filter=not cfg.metrics_on_device,
        activation_offloading=cfg.activation_offloading,
        packing_strategy=cfg.packing_strategy,
        completion_only_loss=cfg.completion_only_loss,
        assistant_only_loss=assistant_only_loss,
    )
    if fsdp:
        args |= fsdp_arguments(cfg, device)
    config = SFTConfig(**(args | overrides))
    use_one_gpu(config)  # one process, one GPU: several GPUs are used through `distributed` (DDP), never DataParallel
    return config


def loss_history(trainer) -> list[tuple[int, float]]:
    """(optimizer step, training loss) of every logging step."""
    return [(h["step"], float(h["loss"])) for h in trainer.state.log_history if "loss" in h]


def _layer_callbacks(cfg: TrainingConfig) -> list[TrainerCallback]:
    if cfg.gradient_checkpointing:
        return [CheckpointFirstLayers(cfg.gradient_checkpointing_layers, cfg.activation_offloading)]
    return []


def parameter_storage_bytes(model) -> int:
    """Bytes of the distinct storage behind the model's parameters (storage FSDP has freed counts 0)."""
    storages = {}
    for param in model.parameters():
        storage = param.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def peak_memory_bytes(device: str) -> int:
    """Peak accelerator memory on CUDA, else the process's peak resident set size."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _start_training(device: str, run_dir: str | None, fingerprint: dict | None):
    """What every method does before its trainer: the run folder's newest complete checkpoint to resume from (a
    fresh start writes the fingerprint first), and the process's graceful stop."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    resume_from = latest_complete_checkpoint(run_dir) if run_dir else None
    if run_dir and resume_from is None and fingerprint is not None:
        write_fingerprint(run_dir, fingerprint)
    return resume_from, current_stop()


@contextlib.contextmanager
def _compiled_layers(model, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    compile_decoder_layers(model)
    try:
        yield
    finally:
        uncompile_decoder_layers(model)  # evaluation, generation and saving run eager


def _run_trainer(trainer, checkpoint_dir: str, resume_from, stop, unload_after_failure=True, contexts=()):
    """`trainer.train()` as every method runs it: stopped gracefully at the next step on a stop request (with a
    checkpoint), and after a failure or a stop the base model as it came in (peft's `unload`), so a retry gets it
    back without reloading. `contexts`: context managers training runs inside. Returns (output, wall seconds)."""
    if stop is not None:
        trainer.add_callback(StopAtNextStep(stop, lambda: trainer.last_checkpoint_save_s))
    started = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if stop is not None:
                stack.enter_context(stop.deferred())
            for context in contexts:
                stack.enter_context(context)
            output = trainer.train(resume_from_checkpoint=resume_from)
    except BaseException:
        if unload_after_failure:
            trainer.model.unload()
        raise
    wall_s = time.perf_counter() - started
    if stop is not None and stop.requested:
        step = trainer.state.global_step
        checkpoint = Path(checkpoint_dir) / f"checkpoint-{step}"
        if unload_after_failure:
            trainer.model.unload()
        raise stop.interrupted(step, str(checkpoint) if checkpoint.is_dir() else None)
    return output, wall_s


def _training_metrics(trainer, output, wall_s: float, device: str) -> dict[str, float]:
    tokens = float(trainer.state.num_input_tokens_seen)  # restored from the checkpoint when resuming
    return {
        "train_loss": float(output.training_loss),
        "train_runtime_s": wall_s,
        "train_steps": float(trainer.state.global_step),
        "train_tokens": tokens,
        "train_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "train_peak_memory_mib": peak_memory_bytes(device) / 2**20,
    }


def train_adapter(
    model: PreTrainedModel,
    data: DatasetSplits,
    tokenizer: PreTrainedTokenizerBase,
    lora_cfg: LoraAdapterConfig,
    cfg: TrainingConfig,
    device: str,
    report_to_mlflow: bool = False,
    extra_callbacks: list[TrainerCallback] | None = None,
    run_dir: str | None = None,
    fingerprint: dict | None = None,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    fsdp: bool = False,
    stage=None,
    **sft_overrides,
) -> TrainResult:
    """Apply LoRA to the 4-bit `model` and train it with SFTTrainer; returns the PEFT model and its metrics.

    LoRA is applied in this one place: SFTTrainer wraps the model with `build_lora_config(lora_cfg)` (peft's
    get_peft_model), then keeps the adapter in bf16 as QLoRA does. If training fails, the adapter is unloaded again
    (peft's `unload`), so a retry gets the same base model back without reloading it.

    With `run_dir` (the flow's run folder, which this process holds): checkpoints go there, training continues from
    its newest complete checkpoint if it has one (a resumed run, or a retry of this task), and a fresh start writes
    `fingerprint` there first. Without it (bench, tests): `training.output_dir`, always from step 0.

    `fsdp` (in a process torchrun started): the Trainer shards the model across the processes (`fsdp_arguments`);
    afterwards every process takes part in gathering the LoRA weights, which rank 0 returns in
    `adapter_state_dict`.

    `stage` (`Stage`: the run's config and its starting adapter): a method other than SFT (`training.method`), through
    its TRL trainer (qlora/stages.py); the reference policy is the starting adapter, and LoRA comes from that adapter
    when there is one.
    """
    if cfg.method != "sft":
        return _train_stage(
            model,
            data,
            tokenizer,
            lora_cfg,
            cfg,
            device,
            report_to_mlflow,
            extra_callbacks,
            run_dir,
            fingerprint,
            log,
            stage,
        )
    resume_from, stop = _start_training(device, run_dir, fingerprint)
    if use_liger_kernels(cfg.liger_kernels, device) and (reason := liger_unsupported(model.config)):
        (log or logging.getLogger(__name__)).info("Liger kernels are off for %s: %s", model.config.model_type, reason)
        sft_overrides["use_liger_kernel"] = False
    wrapped = cfg.packing and cfg.packing_strategy == "wrapped"
    loss = decide_assistant_only_loss(cfg.assistant_only_loss, data.kind, tokenizer, wrapped)
    (log or logging.getLogger(__name__)).info("%s", loss.reason)
    # SFTTrainer tokenizes the rows while it is built: with the training template (generation markers) there, and
    # the tokenizer's own template back afterwards, for evaluation, generation and saving.
    with training_template_applied(tokenizer, loss.template):
        trainer = PipelineSFTTrainer(
            model=model,
            args=build_sft_config(
                cfg,
                device,
                run_dir or cfg.output_dir,
                report_to_mlflow,
                fsdp,
                assistant_only_loss=loss.assistant_only_loss,
                **sft_overrides,
            ),
            train_dataset=data.train,
            peft_config=build_lora_config(lora_cfg, model),
            processing_class=tokenizer,
            callbacks=[RunLoggerProgress(log), *([] if fsdp else _layer_callbacks(cfg)), *(extra_callbacks or [])],
            metrics_on_device=cfg.metrics_on_device,
        )
    full_bytes = parameter_storage_bytes(trainer.model) if fsdp else 0  # base + LoRA, before FSDP shards them
    if cfg.fused_lora and not fsdp:  # the fused forward reads lora_B's weight, which FSDP keeps sharded there
        fuse_lora_layers(trainer.model)
    padding_free = bool(getattr(trainer, "padding_free", False))
    output, wall_s = _run_trainer(
        trainer,
        run_dir or cfg.output_dir,
        resume_from,
        stop,
        unload_after_failure=not fsdp,  # (an FSDP run is a process of its own, and ends there)
        contexts=[
            _compiled_layers(trainer.model, cfg.compile_layers and not fsdp),
            packed_training_attention(trainer.model, resolve_attention(cfg.attention, device), padding_free, log),
        ],
    )
    metrics = _training_metrics(trainer, output, wall_s, device)
    model, adapter_state = trainer.model, None
    if fsdp:
        # The proof that the weights are sharded: this process keeps ~1/world of the parameter storage (its
        # flat-parameter shards; FSDP frees the storage of the full-size views between uses).
        metrics["fsdp_local_parameter_share"] = parameter_storage_bytes(trainer.model) / full_bytes
        # A collective: every rank sends its shards, rank 0 receives the full state dict (on the CPU).
        full_state = trainer.accelerator.get_state_dict(trainer.model)
        adapter_state = {name: tensor for name, tensor in full_state.items() if "lora_" in name}
        del full_state
        model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    lora_weights = adapter_state.items() if adapter_state else model.named_parameters()
    adapter_dtype = next((str(p.dtype).removeprefix("torch.") for n, p in lora_weights if "lora_" in n), "bfloat16")
    return TrainResult(
        model=model,
        metrics=metrics,
        loss_history=loss_history(trainer),
        train_dataset=trainer.train_dataset,
        resumed_from=resume_from,
        adapter_dtype=adapter_dtype,
        adapter_state_dict=adapter_state,
    )


@dataclass
class Stage:
    """What a stage other than SFT needs beyond the training settings: the whole config (its `preference` / `grpo`
    section) and the adapter it starts from."""

    config: object  # PipelineConfig
    starting: object = None  # qlora.stages.StartingAdapter


def _train_stage(
    model,
    data,
    tokenizer,
    lora_cfg,
    cfg,
    device,
    report_to_mlflow,
    extra_callbacks,
    run_dir,
    fingerprint,
    log,
    stage: Stage,
) -> TrainResult:
    """DPO, KTO or GRPO (qlora/stages.py) with what SFT has around its trainer: the run folder's checkpoints and
    resume, the graceful stop, the adapter unloaded again after a failure, the same metrics."""
    from qlora.stages import build_stage_trainer, stage_model

    log = log or logging.getLogger(__name__)
    resume_from, stop = _start_training(device, run_dir, fingerprint)
    starting = stage.starting
    policy = stage_model(model, starting)
    peft_config = None if starting is not None else build_lora_config(lora_cfg, model)
    log.info(
        "training.method %s from %s; reference policy: %s",
        cfg.method,
        starting.spec if starting else "the base model",
        "a frozen copy of that adapter" if starting else "the base model (adapter disabled)",
    )
    policy_rejected = stage.config.preference.policy_rejected if cfg.method == "dpo" else None
    pairs = None
    if policy_rejected is not None:  # the starting policy's own mistakes become the rejected answers
        from qlora.policy_pairs import policy_pairs

        pairs = policy_pairs(policy, tokenizer, data.train, policy_rejected, run_dir, log)
        data = dataclasses.replace(data, train=pairs.train)
    args = trainer_arguments(cfg, device, run_dir or cfg.output_dir, report_to_mlflow)
    args["include_num_input_tokens_seen"] = "non_padding"
    callbacks = [RunLoggerProgress(log), *_layer_callbacks(cfg), *(extra_callbacks or [])]
    trainer = build_stage_trainer(cfg.method, policy, data, tokenizer, stage.config, args, peft_config, callbacks)
    output, wall_s = _run_trainer(trainer, run_dir or cfg.output_dir, resume_from, stop)
    model = trainer.model
    model.eval()  # the starting adapter stays, as "ref": evaluation measures it as the run's "before"
    metrics = _training_metrics(trainer, output, wall_s, device)
    # the stage's own figures as TRL logged them last (DPO: rewards/margins, rewards/accuracies; GRPO: reward,
    # rewards/<function>/mean, kl, completions/mean_length): MLflow has their history through report_to
    last = {}
    for entry in trainer.state.log_history:
        last |= {
            k: float(v) for k, v in entry.items() if isinstance(v, int | float) and ("/" in k or k in ("reward", "kl"))
        }
    metrics |= {f"stage/{k}": v for k, v in last.items()}
    if pairs is not None:
        metrics |= pairs.metrics
    adapter_dtype = next(
        (str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if "lora_" in n), "bfloat16"
    )
    return TrainResult(
        model=model,
        metrics=metrics,
        loss_history=loss_history(trainer),
        train_dataset=trainer.train_dataset,
        resumed_from=resume_from,
        adapter_dtype=adapter_dtype,
    )


def save_trained_adapter(result: TrainResult, folder) -> None:
    """`save_pretrained` of the trained adapter, as one ordinary PEFT adapter folder.

    FSDP: the LoRA weights gathered from the shards (`adapter_state_dict`) are saved through a PEFT model of the same
    architecture built on the meta device (no memory). The live model can't save them: peft 0.21.2 picks the
    adapter's weights by module name, and under nested FSDP units those names carry `_fsdp_wrapped_module.` in the
    middle (peft strips it only at the start), so it would write an adapter with no weights."""
    if result.adapter_state_dict is None:
        # the trained adapter alone: a stage also holds its starting adapter, frozen, as "ref" (qlora/stages.py)
        result.model.save_pretrained(folder, safe_serialization=True, selected_adapters=["default"])
        return
    import copy

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    lora_config = copy.deepcopy(result.model.peft_config["default"])
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(result.model.get_base_model().config)
    skeleton = get_peft_model(skeleton, lora_config)
    skeleton.save_pretrained(folder, safe_serialization=True, state_dict=result.adapter_state_dict)


def save_training_outcome(result: TrainResult, run_dir: str | os.PathLike, extra: dict | None = None) -> None:
    """The trained adapter (`trained-adapter/`, with checksums) and what training measured (`train-result.json`,
    written last, so it marks both), in the run folder: an attempt whose evaluation, saving or registration fails
    leaves them, and the re-run continues from them instead of training again."""
    run_dir = Path(run_dir)
    with atomic_folder(run_dir / TRAINED_ADAPTER_DIRNAME, replace=True, what="the trained adapter") as tmp:
        save_trained_adapter(result, tmp)
        write_checksums(tmp)
    summary = {
        "metrics": result.metrics,
        "loss_history": result.loss_history,
        "resumed_from": result.resumed_from,
        "adapter_dtype": result.adapter_dtype,
        **(extra or {}),
    }
    write_text_atomic(run_dir / TRAIN_RESULT_NAME, json.dumps(summary, indent=1))


def read_training_outcome(run_dir: str | os.PathLike) -> dict | None:
    """What `save_training_outcome` left in the run folder, when its trained adapter is intact; else None."""
    run_dir = Path(run_dir)
    try:
        outcome = json.loads((run_dir / TRAIN_RESULT_NAME).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if damaged_files(run_dir / TRAINED_ADAPTER_DIRNAME) != []:  # damaged, or no checksums: train again
        return None
    return outcome


def trained_result(base: PreTrainedModel, run_dir: str | os.PathLike, outcome: dict, starting=None) -> TrainResult:
    """`base` with the run folder's trained adapter, as a TrainResult (what training measured, from `outcome`);
    with a stage's `starting` adapter beside it (qlora/stages.py), as training left the model."""
    from qlora.model import load_trained_adapter
    from qlora.stages import load_starting_adapter

    model = load_trained_adapter(base, Path(run_dir) / TRAINED_ADAPTER_DIRNAME, outcome["adapter_dtype"])
    load_starting_adapter(model, starting)
    return TrainResult(
        model=model,
        metrics=outcome["metrics"],
        loss_history=[tuple(x) for x in outcome["loss_history"]],
        resumed_from=outcome["resumed_from"],
        adapter_dtype=outcome["adapter_dtype"],
    )


def train_run(
    model, data, tokenizer, cfg, device: str, run_dir: str, fingerprint: dict, log=None, callbacks=None, starting=None
) -> TrainResult:
    """`train_adapter` as a flow run trains: the run's settings, its own run folder, loss logged to MLflow; sharded
    with FSDP when `distributed.strategy` says so and this is one of several processes. `callbacks`: more Trainer
    callbacks (a sweep trial's pruning check). `starting`: the adapter a stage starts from (qlora/stages.py)."""
    return train_adapter(
        model,
        data,
        tokenizer,
        cfg.lora,
        cfg.training,
        device,
        report_to_mlflow=True,
        run_dir=run_dir,
        fingerprint=fingerprint,
        log=log,
        fsdp=cfg.distributed.strategy == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        extra_callbacks=callbacks,
        stage=Stage(cfg, starting),
    )
