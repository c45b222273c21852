"""transformers Trainer internals: atomic checkpoints, adapter dtype on resume, and partial activation checkpointing.

Written for transformers 5.24 / trl 1.16. Private names used (tests/test_integrations.py checks them):
`Trainer._save_checkpoint(model, trial)`, `Trainer._load_from_checkpoint(resume_from_checkpoint, model=None)`,
`Trainer._get_output_dir(trial)`, the `gradient_checkpointing` attribute of
`transformers.modeling_layers.GradientCheckpointingLayer`, and `TrainingArguments._n_gpu`.
"""

from __future__ import annotations

import errno
import os
import shutil

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTTrainer

from qlora.errors import PipelineInputError
from qlora.files import fsync_dir
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


class AtomicCheckpointSFTTrainer(SFTTrainer):
    """SFTTrainer whose checkpoints appear all at once: written into a staging folder, then renamed into place.

    transformers writes `checkpoint-N` file by file; a kill in the middle would leave a folder that
    `get_last_checkpoint` picks up and resume then fails on. Here a `checkpoint-N` folder exists only complete.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        """Resume with the adapter weights in the dtype training uses: peft up-casts loaded adapters to fp32,
        while SFTTrainer keeps QLoRA adapters in bf16, so an un-fixed resume would train on different numerics."""
        target = model if model is not None else self.model
        dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        cast_params(target, dtypes)

    def _save_checkpoint(self, model, trial) -> None:
        # Under DDP every process writes its part (its RNG state; the main one the weights and optimizer) into the
        # staging folder; only the main process clears it before and renames it after, between barriers.
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, STAGING_DIRNAME)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        get_output_dir = self._get_output_dir
        self._get_output_dir = lambda trial=None: staging  # super() writes checkpoint-N under staging
        try:
            super()._save_checkpoint(model, trial)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise PipelineInputError(
                    f"disk full while writing a checkpoint in {run_dir}: free space and re-run; training resumes "
                    "from the newest complete checkpoint"
                ) from None
            raise
        finally:
            self._get_output_dir = get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            target = os.path.join(run_dir, name)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(os.path.join(staging, name), target)
            fsync_dir(run_dir)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


class CheckpointFirstLayers(TrainerCallback):
    """Keep activation checkpointing only on the first N decoder layers (`training.gradient_checkpointing_layers`):
    each layer left out trades its recompute (~1/3 of its step time) for its activations' memory.

    N unset = all but the last layer: the last layer's recompute would run right after the forward, when the
    peak (every checkpoint + one layer's full activations) is the same either way, so it buys no memory."""

    def __init__(self, layers: int | None) -> None:
        self.layers = layers

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        layers = self.layers if self.layers is not None else len(blocks) - 1
        for index, block in enumerate(blocks):
            block.gradient_checkpointing = index < layers
