"""transformers Trainer / TRL trainer internals (SFT, DPO, KTO, GRPO): atomic checkpoints, adapter dtype on
resume, training steps without host syncs, and partial activation checkpointing.

Written for transformers 5.24 / trl 1.16. Private names used (tests/test_integrations.py checks them):
`Trainer._save_checkpoint(model, trial)`, `Trainer._load_from_checkpoint(resume_from_checkpoint, model=None)`,
`Trainer._get_output_dir(trial)`, `Trainer._track_num_input_tokens(inputs)`, `SFTTrainer.compute_loss` with the
fused LM head's outputs (`log_probs`, `entropy`, `is_top1`, `label_mask`), SFTTrainer's `_metrics`,
`_total_train_tokens`, `_tp_size` and `aux_loss_enabled`, the `gradient_checkpointing` attribute of
`transformers.modeling_layers.GradientCheckpointingLayer`, and `TrainingArguments._n_gpu`.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import DPOTrainer, GRPOTrainer, KTOTrainer, SFTTrainer

from qlora.errors import disk_full_error
from qlora.files import folder_size_bytes, fsync_dir, write_checksums
from qlora.model import cast_params
from qlora.run_folder import STAGING_DIRNAME

WRITTEN_FOR = {"transformers": "5.24.0", "trl": "1.16.0"}


def use_one_gpu(args) -> None:
    """A single training process uses one GPU (the current device) even when several are visible: Trainer would
    otherwise wrap the model in nn.DataParallel, which TRL's SFTTrainer refuses. transformers has no public switch:
    `TrainingArguments.n_gpu` returns `_n_gpu`, set to the visible device count when the devices are set up."""
    from transformers.training_args import ParallelMode

    if args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:  # several GPUs, one process
        args._n_gpu = 1


def quantized_compute_dtype(model) -> torch.dtype | None:
    """bnb_4bit_compute_dtype of a 4-bit model (its config's quantization_config), None for another model."""
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    dtype = (
        quant.get("bnb_4bit_compute_dtype")
        if isinstance(quant, dict)
        else getattr(quant, "bnb_4bit_compute_dtype", None)
    )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else None


class AdapterInComputeDtype:
    """TRL (1.16: SFTTrainer, DPOTrainer, KTOTrainer, GRPOTrainer `__init__`) casts a quantized model's trainable
    weights to bf16, the QLoRA paper's choice, whatever the compute dtype. With a float32 compute dtype (a CPU
    without bf16 instructions, where quantization.compute_dtype auto settles on it) the LoRA matmuls would then run
    in emulated bf16: SFT on the embedded default trained at 38 tokens/s against ~200 tokens/s (2-core AVX2 EPYC,
    2026-12-02). Here the trainable LoRA weights go back to float32 after TRL's cast; with a bf16 or fp16 compute
    dtype TRL's choice stands."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if quantized_compute_dtype(self.model) != torch.float32:
            return
        for name, param in self.model.named_parameters():
            if param.requires_grad and "lora_" in name and param.dtype == torch.bfloat16:
                param.data = param.data.to(torch.float32)


class AtomicCheckpoints:
    """For any transformers Trainer (SFT, DPO, KTO, GRPO): checkpoints appear all at once (written into a staging
    folder, checksummed into `SHA256SUMS.json`, what a resume verifies, then renamed into place; a failed or
    interrupted save leaves no staging folder behind), and a resumed adapter trains in the dtype it was trained in.
    `last_checkpoint_save_s`: how long the last checkpoint took (graceful stop)."""

    last_checkpoint_save_s: float | None = None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        """Resume with the adapter weights in the dtype training uses: peft up-casts loaded adapters to fp32,
        while SFTTrainer keeps QLoRA adapters in bf16, so an un-fixed resume would train on different numerics."""
        target = model if model is not None else self.model
        dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        cast_params(target, dtypes)

    def _save_checkpoint(self, model, trial) -> None:
        # Under DDP every process writes its part (its RNG state; the main one the weights and optimizer) into the
        # staging folder; only the main process clears it before, checksums and renames it after, between barriers.
        started = time.perf_counter()
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, STAGING_DIRNAME)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        get_output_dir = self._get_output_dir
        self._get_output_dir = lambda trial=None: staging  # super() writes checkpoint-N under staging
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                write_checksums(os.path.join(staging, name))  # what a resume verifies the checkpoint against
        except BaseException as exc:
            full = None
            if isinstance(exc, Exception):  # (a stop at once is not a full disk)
                full = disk_full_error(exc, run_dir, f"checkpoint {name}", self._checkpoint_bytes(run_dir))
            shutil.rmtree(staging, ignore_errors=True)  # a failed or interrupted save leaves nothing behind
            if full is not None:
                raise full from None
            raise
        finally:
            self._get_output_dir = get_output_dir
        if self.args.should_save:
            target = os.path.join(run_dir, name)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(os.path.join(staging, name), target)
            fsync_dir(run_dir)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint_save_s = time.perf_counter() - started

    @staticmethod
    def _checkpoint_bytes(run_dir: str) -> int | None:
        """Size of the newest complete checkpoint (what the next one needs), if there is one."""
        done = [p for p in Path(run_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()]
        if not done:
            return None
        newest = max(done, key=lambda p: int(p.name.split("-")[-1]))
        return folder_size_bytes(newest)


class PipelineSFTTrainer(AdapterInComputeDtype, AtomicCheckpoints, SFTTrainer):
    """SFTTrainer with three changes:

    - Checkpoints appear all at once: written into a staging folder, checksummed (`SHA256SUMS.json`, what a resume
      verifies), then renamed into place. transformers writes `checkpoint-N` file by file; a kill in the middle would
      leave a folder that `get_last_checkpoint` picks up and resume then fails on. Here a `checkpoint-N` folder
      exists only complete. A save that fails (a full disk: one line naming the folder and the space needed) or is
      interrupted leaves no staging folder behind.
    - A resumed adapter trains in the dtype it was trained in (`_load_from_checkpoint`).
    - `metrics_on_device=True` (`training.metrics_on_device`): no host sync inside a training step. Trainer reads
      the token count of every micro-batch back to the host (`.item()`), and TRL its entropy, token accuracy and
      token count (four more); each read drains the GPU's queue, and the GPU then waits while Python launches the
      next kernels (~13% of a 7B step on an H100, docs/benchmarks.md). Here these sums stay on the device and are
      read once per logging or saving step (`flush_device_counters`). Entropy and accuracy are then token-weighted
      over the logging window (TRL averages per-micro-batch ratios). The loss is computed exactly as TRL computes it;
      any set-up other than TRL's plain NLL through the fused LM head runs TRL's own `compute_loss`.
    """

    def __init__(self, *args, metrics_on_device: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.metrics_on_device = metrics_on_device
        self._device_sums: dict[str, torch.Tensor] = {}
        if metrics_on_device:
            # First in line, so every callback's on_step_end (and the log) sees the flushed counts.
            self.callback_handler.callbacks.insert(0, FlushDeviceCounters(self))

    def _add_on_device(self, name: str, value) -> None:
        held = self._device_sums.get(name)
        self._device_sums[name] = value if held is None else held + value

    def _track_num_input_tokens(self, inputs) -> None:
        if not self.metrics_on_device or self.args.include_num_input_tokens_seen == "no":
            return super()._track_num_input_tokens(inputs)
        main_input_name = getattr(self.model, "main_input_name", "input_ids")
        if main_input_name not in inputs:
            return super()._track_num_input_tokens(inputs)  # (it warns)
        ids = inputs[main_input_name]
        pad = getattr(self.processing_class, "pad_token_id", None)
        if self.args.include_num_input_tokens_seen != "non_padding":
            count = torch.as_tensor(ids.numel(), device=ids.device)
        elif "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
        elif pad is not None:
            count = (ids != pad).sum()
        else:
            count = torch.as_tensor(ids.numel(), device=ids.device)
        count = count.to(self.args.device, torch.int64)
        self._add_on_device("input_tokens", self.accelerator.gather(count).sum())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parallel = self.accelerator.parallelism_config
        plain = (
            self.metrics_on_device
            and not return_outputs
            and self.model.training
            and self.compute_loss_func is None
            and self.label_smoother is None
            and not self.aux_loss_enabled
            and self.args.loss_type == "nll"
            and not (parallel is not None and getattr(parallel, "sp_enabled", False))
        )
        if not plain:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # TRL's loss, as in SFTTrainer.compute_loss: the fused LM head's per-token log-probabilities
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        # TRL's metrics, summed on the device (gathered across processes when read)
        self._add_on_device("valid", outputs.label_mask.sum())
        self._add_on_device("entropy", outputs.entropy.detach().float().sum())
        self._add_on_device("correct", outputs.is_top1.sum())
        if "attention_mask" in inputs:
            self._add_on_device("batch_tokens", inputs["attention_mask"].sum())
        else:  # padding-free: one row of real tokens (a size, known on the host)
            self._add_on_device("batch_tokens", inputs["position_ids"].size(1))
        return loss

    def flush_device_counters(self) -> None:
        """Read the device sums back (one sync) into Trainer's token count and TRL's metrics."""
        sums, self._device_sums = self._device_sums, {}
        if "input_tokens" in sums:
            self.state.num_input_tokens_seen += int(sums["input_tokens"].item())
        if "valid" not in sums:
            return
        device = self.args.device
        keys = ("valid", "entropy", "correct", "batch_tokens")
        local = torch.stack([torch.as_tensor(sums[k], device=device, dtype=torch.float64) for k in keys])
        valid, entropy, correct, tokens = self.accelerator.reduce(local, reduction="sum").tolist()
        metrics = self._metrics["train"]
        metrics["entropy"].append(entropy / valid if valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
        self._total_train_tokens += int(tokens) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

    def log(self, logs, start_time=None) -> None:
        if self.metrics_on_device and self.model.training:
            self.flush_device_counters()
        super().log(logs, start_time)


class FlushDeviceCounters(TrainerCallback):
    """`metrics_on_device`: read the device sums at the end of the steps that log or save, and at the end of
    training, so everything that reads the token count then (logs, checkpoints, callbacks) sees it exact. In the
    steps between, `state.num_input_tokens_seen` lags by the tokens not yet read."""

    def __init__(self, trainer: PipelineSFTTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        logs = args.logging_strategy == "steps" and state.logging_steps and step % state.logging_steps == 0
        saves = args.save_strategy == "steps" and state.save_steps and step % state.save_steps == 0
        if logs or saves or step >= state.max_steps or (step == 1 and args.logging_first_step):
            self.trainer.flush_device_counters()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.flush_device_counters()


class CheckpointFirstLayers(TrainerCallback):
    """Keep activation checkpointing only on the first N decoder layers (`training.gradient_checkpointing_layers`):
    each layer left out trades its recompute (~1/3 of its step time) for its activations' memory.

    N unset = all but the last layer: the last layer's recompute would run right after the forward, when the
    peak (every checkpoint + one layer's full activations) is the same either way, so it buys no memory. With
    activation offloading (`offloading`) unset means all layers: there the last layer's full activations would
    travel to host memory and straight back (at 262k tokens ~30 GiB of pinned host memory for nothing)."""

    def __init__(self, layers: int | None, offloading: bool = False) -> None:
        self.layers = layers
        self.offloading = offloading

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        layers = self.layers if self.layers is not None else len(blocks) - (0 if self.offloading else 1)
        for index, block in enumerate(blocks):
            block.gradient_checkpointing = index < layers


class PipelineDPOTrainer(AdapterInComputeDtype, AtomicCheckpoints, DPOTrainer):
    """TRL's DPOTrainer with atomic checkpoints."""


class PipelineKTOTrainer(AdapterInComputeDtype, AtomicCheckpoints, KTOTrainer):
    """TRL's KTOTrainer with atomic checkpoints."""


class PipelineGRPOTrainer(AdapterInComputeDtype, AtomicCheckpoints, GRPOTrainer):
    """TRL's GRPOTrainer with atomic checkpoints."""
