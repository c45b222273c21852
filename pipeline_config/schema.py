"""The pipeline's one typed configuration.

Every field carries a description; unknown keys are rejected; checks that involve several fields live in
model validators. Reading YAML files and `--set section.key=value` overrides into a `PipelineConfig`, and wording
what is wrong with them, is pipeline_config/loading.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline_config.evaluation import EvaluationConfig, RegistryConfig
from pipeline_config.section import Section
from pipeline_config.stages import METHOD_DATA_FORMATS, GrpoConfig, PreferenceConfig, TrainingMethod

DTypeName = Literal["float16", "bfloat16", "float32"]


class ModelConfig(Section):
    """Which base model to fine-tune and how to fetch it."""

    name_or_path: str = Field(
        description="Hub model id (e.g. 'NousResearch/Llama-2-7b-chat-hf'), a local folder with a transformers "
        "checkpoint, or 'pkg:<python package>' for a model file shipped inside an installed package."
    )
    gguf_file: str | None = Field(
        default=None,
        description="GGUF file name inside `name_or_path`. A GGUF model is converted once to a plain safetensors "
        "checkpoint under `cache_dir`, because transformers can neither save nor 4-bit-load a GGUF model directly.",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) to load.")
    cache_dir: str = Field(
        default=".cache/models", description="Folder for converted checkpoints (relative to the working folder)."
    )
    hub_token_env: str = Field(
        default="HF_TOKEN",
        description="Name of the environment variable that holds the hub token for gated models. The token itself "
        "never goes into a config file.",
    )
    hub_token_secret_block: str | None = Field(
        default=None,
        description="Prefect Secret block holding the hub token, used when the environment variable is unset.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the hub. Off unless you trust the repository."
    )
    adapter: str | None = Field(
        default=None,
        description="Start from this LoRA adapter instead of the bare base: an adapter folder a run saved "
        "(outputs/<run>/adapter) or a registry URI (models:/NAME@champion, models:/NAME/3). Its base must be this "
        "model. DPO, KTO and GRPO keep it, frozen, as their reference policy; training continues its weights.",
    )


class QuantizationConfig(Section):
    """bitsandbytes 4-bit loading of the base model (transformers.BitsAndBytesConfig)."""

    load_in_4bit: bool = Field(default=True, description="Load the base model in 4-bit (QLoRA). Must stay true.")
    load_in_8bit: bool = Field(
        default=False, description="8-bit loading; not QLoRA, so it cannot be combined with 4-bit."
    )
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type: NF4 or FP4.")
    compute_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        default="auto",
        description="dtype of the de-quantised weights during matmuls (bnb_4bit_compute_dtype), and of the LoRA "
        "weights. auto: that of training.bf16 / fp16 when one is on; else bfloat16 where the device computes in it "
        "(a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), float16 on an older GPU, float32 on a CPU without "
        "bf16 instructions (which emulates bf16 matmuls ~35x slower). Settled when the run starts; MLflow logs the "
        "dtype used.",
    )
    double_quant: bool = Field(
        default=False, description="Quantise the quantisation constants too (bnb_4bit_use_double_quant)."
    )
    quant_storage_dtype: Literal["uint8", "float16", "bfloat16", "float32"] = Field(
        default="uint8", description="dtype that stores the packed 4-bit weights (bnb_4bit_quant_storage)."
    )

    @model_validator(mode="after")
    def _four_bit_only(self) -> QuantizationConfig:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("quantization.load_in_8bit and load_in_4bit are both true: choose one (QLoRA is 4-bit)")
        if not self.load_in_4bit:
            raise ValueError("quantization.load_in_4bit must be true: this pipeline fine-tunes with QLoRA")
        return self


class LoraAdapterConfig(Section):
    """LoRA adapter settings (peft.LoraConfig)."""

    r: int = Field(default=16, gt=0, description="LoRA rank.")
    alpha: float = Field(default=32, gt=0, description="LoRA scaling numerator (lora_alpha); scale = alpha / r.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input, in [0, 1).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear' for every linear layer but the "
        "output head.",
    )
    target_parameters: list[str] = Field(
        default=[],
        description="Mixture-of-experts weights to adapt too (peft's target_parameters): the fused 3-D expert "
        "parameters, named as target_modules are, e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj], or "
        "[all-experts] for every one. Each gets a rank-r LoRA per expert; LoRA on experts cannot use dropout.",
    )
    bias: Literal["none", "all", "lora_only"] = Field(default="none", description="Which biases to train.")

    @model_validator(mode="after")
    def _some_targets(self) -> LoraAdapterConfig:
        if isinstance(self.target_modules, list) and not [m for m in self.target_modules if m.strip()]:
            raise ValueError(
                "lora.target_modules is empty: list module names (e.g. [q_proj, v_proj]) or use 'all-linear'"
            )
        if self.target_parameters and self.dropout:
            raise ValueError(
                "lora.target_parameters: peft's LoRA on expert weights has no dropout (it cannot be factored out of "
                "the per-expert product): set lora.dropout to 0 or drop lora.target_parameters"
            )
        if any(not t.strip() for t in self.target_parameters):
            raise ValueError("lora.target_parameters has a blank entry: name expert parameters or use [all-experts]")
        return self

    upcast_base_to_fp32: bool = Field(
        default=False,
        description="Run peft's prepare_model_for_kbit_training: fp32 copies of every non-4-bit weight (norms, "
        "embeddings, LM head). The original recipe did (TRL <= 0.7 called it inside SFTTrainer); off, they stay in "
        "the compute dtype, which is much faster on a GPU and trains the same (docs/benchmarks.md).",
    )


class DataColumnsConfig(Section):
    """Column names in the source data, for each supported format."""

    text: str = Field(default="text", description="Column with the full training text (format 'text').")
    messages: str = Field(default="messages", description="Column with a list of {role, content} chat turns.")
    instruction: str = Field(default="instruction", description="Alpaca instruction column.")
    input: str = Field(default="input", description="Alpaca optional input column.")
    output: str = Field(default="output", description="Alpaca answer column.")
    prompt: str = Field(default="prompt", description="Prompt column (format 'prompt_completion').")
    completion: str = Field(
        default="completion", description="Completion column (formats 'prompt_completion', 'unpaired_preference')."
    )
    chosen: str = Field(default="chosen", description="Preferred answer column (format 'preference').")
    rejected: str = Field(default="rejected", description="Dispreferred answer column (format 'preference').")
    label: str = Field(
        default="label", description="Column saying whether the completion is desirable (format 'unpaired_preference')."
    )
    answer: str = Field(
        default="answer",
        description="Expected-answer column (format 'prompt_only', optional): what the exact_match and field_match "
        "rewards compare with, and the reference of the held-out evaluation. It reaches rewards as `answer`.",
    )


class DataConfig(Section):
    """Where the training data comes from and how rows are read."""

    source: str = Field(
        description="'bundled:orders' (the offline dataset generated by project code; for the stages after SFT the "
        "same orders as 'bundled:orders-preference', 'bundled:orders-unpaired', 'bundled:orders-prompts'), a local "
        ".jsonl/.json/.csv/.parquet file, or a hub dataset id such as 'mlabonne/guanaco-llama2-1k'."
    )
    format: Literal[
        "auto", "messages", "text", "alpaca", "prompt_completion", "preference", "unpaired_preference", "prompt_only"
    ] = Field(
        default="auto",
        description="Row format; 'auto' picks it from the columns present. SFT: messages, text, alpaca, "
        "prompt_completion. DPO: preference (prompt/chosen/rejected). KTO: unpaired_preference "
        "(prompt/completion/label). GRPO: prompt_only (prompt, plus the columns its rewards read). Prompts and "
        "answers are text, or chat turns (a prompt as a list of {role, content}, an answer as text or a list with "
        "its assistant turn).",
    )
    columns: DataColumnsConfig = Field(default_factory=DataColumnsConfig, description="Column mapping.")
    eval_source: str | None = Field(
        default=None, description="Separate held-out file or hub id; if unset, the eval split comes from `source`."
    )
    train_split: str = Field(default="train", description="Split name of the training rows.")
    eval_split: str | None = Field(
        default=None, description="Split name of held-out rows in `source`; if unset, `eval_fraction` is carved out."
    )
    eval_fraction: float = Field(
        default=0.1, gt=0.0, lt=1.0, description="Fraction of training rows held out when there is no eval split."
    )
    system_prompt: str | None = Field(
        default=None, description="System message added to alpaca / prompt_completion rows turned into chats."
    )
    response_template: str | None = Field(
        default=None,
        description="For format 'text': the string that ends the prompt (e.g. '[/INST]'); used to split held-out "
        "rows into prompt and reference answer for generation.",
    )
    max_train_rows: int | None = Field(default=None, gt=0, description="Use at most this many training rows.")
    max_eval_rows: int | None = Field(default=None, gt=0, description="Use at most this many held-out rows.")
    bundled_train_rows: int = Field(default=1200, ge=1000, description="Rows the bundled generator makes for train.")
    bundled_eval_rows: int = Field(default=240, ge=200, description="Rows the bundled generator makes for eval.")
    seed: int = Field(default=1234, description="Seed for the bundled generator, shuffling and the eval carve-out.")


class TokenizerConfig(Section):
    """Tokenizer set-up."""

    pad_token: str | None = Field(
        default=None,
        description="Pad token to use. Unset: keep the model's if it differs from EOS, else pick an existing "
        "special token that is not EOS (unk, <pad>, <|endoftext|>, ...); fall back to EOS only if none exists.",
    )
    chat_template_file: str | None = Field(
        default=None,
        description="Jinja chat template file that replaces the tokenizer's own (or gives one to a tokenizer "
        "without): e.g. a version with {% generation %} markers, so that training.assistant_only_loss can mask the "
        "assistant turns. Saved with the adapter, so generation uses it too.",
    )


class TrainingConfig(Section):
    """Training arguments. Names follow the original recipe; they are mapped onto the installed transformers."""

    method: TrainingMethod = Field(
        default="sft",
        description="sft (supervised fine-tuning, TRL's SFTTrainer), dpo (DPOTrainer, preference pairs), kto "
        "(KTOTrainer, rows labelled desirable or not) or grpo (GRPOTrainer, rewards of sampled completions). "
        "Settings of dpo/kto: `preference`; of grpo: `grpo`. packing, fused_lora and compile_layers are SFT's "
        "(the other methods run without them).",
    )

    output_dir: str = Field(
        default="outputs/run",
        description="Parent folder of the run folders: each flow run writes its checkpoints and adapter in "
        "`<output_dir>/<UTC time>-<flow run name>`.",
    )
    num_train_epochs: float = Field(default=1.0, gt=0, description="Epochs over the training rows.")
    max_steps: int = Field(
        default=-1, ge=-1, description="Optimizer steps to run (-1 = run `num_train_epochs`; 0 is refused)."
    )
    per_device_train_batch_size: int = Field(default=4, gt=0, description="Rows per micro-batch.")
    gradient_accumulation_steps: int = Field(default=1, gt=0, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute decoder-layer activations in backward: the lean setting (about a third of the peak "
        "memory for ~25% more step time). Off is the fast setting.",
    )
    gradient_checkpointing_layers: int | None = Field(
        default=None,
        gt=0,
        description="With gradient_checkpointing: recompute only the first N decoder layers (as many as memory "
        "needs). Unset = all but the last, whose recompute would save no peak memory (all of them with "
        "activation_offloading, which would otherwise move the last layer's full activations to the host and back).",
    )
    max_grad_norm: float = Field(default=0.3, gt=0, description="Gradient clipping norm.")
    learning_rate: float = Field(
        default=2e-4,
        gt=0,
        le=1,
        description="Peak learning rate, in (0, 1] (QLoRA uses 1e-5 .. 1e-3; above 1 every optimizer here diverges).",
    )
    weight_decay: float = Field(default=0.001, ge=0, description="AdamW weight decay.")
    optim: str = Field(
        default="adamw_torch",
        description="transformers optimizer name (e.g. adamw_torch, paged_adamw_32bit; paged ones need CUDA).",
    )
    lr_scheduler_type: str = Field(default="cosine", description="transformers scheduler name (cosine, constant...).")
    warmup_ratio: float = Field(default=0.03, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    group_by_length: bool = Field(default=False, description="Batch rows of similar length together (less padding).")
    logging_steps: int = Field(default=25, gt=0, description="Log training loss every this many optimizer steps.")
    max_seq_length: int = Field(default=1024, gt=0, description="Tokens per row; longer rows are truncated.")
    packing: bool = Field(
        default=True,
        description="Pack rows into sequences of max_seq_length (TRL packing). With 'bfd' packing the batch is "
        "padding-free: no pad tokens are computed and packed rows never attend to each other (see `attention`).",
    )
    packing_strategy: Literal["bfd", "wrapped"] = Field(
        default="bfd",
        description="TRL packing: 'bfd' keeps rows whole (best-fit decreasing), 'wrapped' cuts rows mid-sequence.",
    )
    completion_only_loss: bool | None = Field(
        default=None,
        description="Loss on the completion only (prompt/completion data). Unset: TRL's default for the data format.",
    )
    assistant_only_loss: bool | None = Field(
        default=None,
        description="Loss on the assistant turns only (chat data), from the `{% generation %}` markers of the chat "
        "template. Unset: on when the tokenizer's chat template marks assistant turns (its own markers, or a training "
        "version TRL or this project ships for it, qlora/chat_template.py) and packing is not 'wrapped', off "
        "otherwise; the run log says which and why. True with a template no training version is known for stops the "
        "run before weights load.",
    )
    save_steps: int = Field(
        default=50,
        ge=0,
        description="Write a checkpoint (adapter, optimizer, scheduler, RNG, step) every N steps; 0 = never.",
    )
    save_total_limit: int = Field(default=2, gt=0, description="Keep only the newest N checkpoints.")
    task_retries: int = Field(
        default=1,
        ge=0,
        description="Prefect retries of the train task; a retry reloads the base model and resumes from the newest "
        "complete checkpoint, never from step 0 (when checkpoints exist).",
    )
    resume: Literal["auto", "never"] = Field(
        default="auto",
        description="Each flow run trains in its own folder under output_dir. 'auto': continue the newest unfinished "
        "run folder when no live process holds it and its fingerprint (settings, data, base model, library versions) "
        "equals this run's, else start a new folder; 'never': always a new folder.",
    )
    stop_grace_s: float = Field(
        default=25.0,
        gt=0,
        description="Seconds a run has to stop after SIGTERM / SIGINT / a Prefect cancellation: training stops at the "
        "next optimizer step and writes a checkpoint of it if one fits in this time (Kubernetes gives 30 s by "
        "default), then the run exits. A second Ctrl-C stops at once.",
    )
    gpu_concurrency_limit: str = Field(
        default="gpu",
        description="Prefect global concurrency limit that runs on one machine queue on for the accelerator "
        "(`make deploy` creates it with one slot). Without such a limit on the server, runs do not queue.",
    )
    gpu_slot_lease_s: float = Field(
        default=60.0,
        ge=5,
        description="Lease of the GPU slots on the Prefect server, renewed while the run lives: a run killed without "
        "a chance to give its slots back (SIGKILL, a lost machine) frees them this long after it died.",
    )
    gpu_slots: int = Field(
        default=1,
        ge=0,
        description="Slots of `gpu_concurrency_limit` this run holds from loading the base model to the end of the "
        "flow; 0 = take none.",
    )
    attention: Literal["auto", "varlen_flash", "sdpa", "eager"] = Field(
        default="auto",
        description="Attention kernel. 'varlen_flash': torch's variable-length flash attention over the packed "
        "documents' boundaries (CUDA; falls back to SDPA for padded batches); 'sdpa' / 'eager': transformers' "
        "kernels, with a block-diagonal mask for packed rows. 'auto': varlen_flash on CUDA when torch has it, else "
        "sdpa.",
    )
    liger_kernels: bool | Literal["auto"] = Field(
        default="auto",
        description="Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (CUDA; the LM-head loss is TRL's own "
        "chunked one). 'auto': on when running on CUDA with liger-kernel installed.",
    )
    fused_lora: bool = Field(
        default=True,
        description="One GEMM per LoRA layer for base + scaled adapter output (add and scaling in the GEMM "
        "epilogue, no defensive copy) instead of peft's three extra passes over each layer's output; peft's own "
        "forward still runs wherever the fused one does not apply (qlora/integrations/fused_lora.py).",
    )
    metrics_on_device: bool = Field(
        default=True,
        description="No host sync inside a training step: token counts and TRL's entropy/accuracy metrics are summed "
        "on the device and read at logging and saving steps only (transformers and TRL read them back after every "
        "micro-batch, which stalls the GPU). False = their own per-micro-batch reads.",
    )
    compile_layers: bool = Field(
        default=False,
        description="torch.compile each decoder layer while training (regional compilation: one compiled graph shared "
        "by all layers, dynamic sequence lengths), fusing the elementwise work around the 4-bit GEMMs; +6 % on an "
        "H100 (docs/benchmarks.md). Liger's kernels are then not used (inductor fuses norms, SwiGLU and RoPE "
        "itself). Costs a compile at the start. Not with gradient_checkpointing or FSDP.",
    )
    activation_offloading: bool = Field(
        default=False,
        description="Move saved activations to pinned host memory in forward and back in backward, on a side CUDA "
        "stream overlapped with compute (TRL's activation offloading). With gradient_checkpointing only the "
        "checkpointed layer inputs are saved, so this moves them (~0.25 MiB per token for a 7B model) off the GPU: "
        "the switch for long documents. CUDA only.",
    )
    bf16: bool = Field(default=False, description="bfloat16 mixed precision.")
    fp16: bool = Field(default=False, description="float16 mixed precision.")
    seed: int = Field(default=42, description="Training seed.")
    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="'auto' = CUDA when present, else CPU (bitsandbytes' CPU backend)."
    )

    @model_validator(mode="after")
    def _one_precision(self) -> TrainingConfig:
        if self.max_steps == 0:
            raise ValueError(
                "training.max_steps is 0, which trains nothing: use -1 (run num_train_epochs) or at least 1"
            )
        if self.bf16 and self.fp16:
            raise ValueError("training.bf16 and training.fp16 are both true: choose one")
        if self.gradient_checkpointing_layers is not None and not self.gradient_checkpointing:
            raise ValueError(
                "training.gradient_checkpointing_layers is set but gradient_checkpointing is false: set "
                "gradient_checkpointing: true, or drop gradient_checkpointing_layers"
            )
        if self.compile_layers and self.gradient_checkpointing:
            raise ValueError(
                "training.compile_layers and gradient_checkpointing are both true: compiled layers keep the "
                "activations checkpointing would drop (25.8 GiB instead of 7.5 on a 7B model): choose one"
            )
        if self.compile_layers and self.liger_kernels is True:
            raise ValueError(
                "training.compile_layers and liger_kernels true: torch.compile can't trace Liger's kernels (it fuses "
                "norms, SwiGLU and RoPE itself): set liger_kernels to auto or false"
            )
        for masked_loss in ("completion_only_loss", "assistant_only_loss"):
            if self.packing and self.packing_strategy == "wrapped" and getattr(self, masked_loss):
                raise ValueError(
                    f"training.packing_strategy 'wrapped' cuts rows mid-sequence, so {masked_loss} cannot be kept: "
                    f"use packing_strategy bfd or {masked_loss} false"
                )
        if self.completion_only_loss and self.assistant_only_loss:
            raise ValueError(
                "training.completion_only_loss and assistant_only_loss are both true: the first is for "
                "prompt/completion data, the second for chat data: choose one"
            )
        return self


class TrackingConfig(Section):
    """MLflow tracking."""

    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI. Unset: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working "
        "folder. Credentials come from the environment only.",
    )
    experiment_name: str = Field(
        default="qlora-finetune", min_length=1, pattern=r"\S", description="MLflow experiment (not blank)."
    )
    artifact_location: str | None = Field(
        default=None,
        description="Artifact root for a new experiment (local folder or URI). Unset: the tracking server's default "
        "(./mlruns beside a local SQLite store).",
    )
    run_name: str | None = Field(default=None, description="MLflow run name (default: generated).")
    system_metrics: bool = Field(
        default=True, description="Log CPU, memory (and GPU, with pynvml) usage during the run."
    )
    system_metrics_interval_s: float = Field(default=5.0, gt=0, description="Seconds between system-metric samples.")


class DistributedConfig(Section):
    """Training on several processes (GPUs) and machines, one process per GPU: DDP (each process holds the whole
    4-bit model; LoRA gradients are averaged) or FSDP-QLoRA (the 4-bit model is sharded across the processes, for
    models that don't fit one card). Launched by torch.distributed's launcher (torchrun) on this machine and the
    machines that join it, or by Ray Train on a Ray cluster (qlora/ray_launch.py)."""

    launcher: Literal["torchrun", "ray"] = Field(
        default="torchrun",
        description="'torchrun': the processes of this machine (num_processes), joined by those other machines "
        "start (num_machines). 'ray': Ray Train's TorchTrainer places num_processes workers on a Ray cluster "
        "(ray_address), restarts them after a lost worker or node (max_failures); needs `pip install -e .[ray]`.",
    )
    num_processes: int | Literal["auto"] = Field(
        default=1,
        description="torchrun: training processes on this machine: 1 (in the flow's own process), N, or 'auto' (one "
        "per visible GPU); above 1, train-adapter launches them with torchrun. ray: the workers on the cluster "
        "(a number), one GPU each on a GPU run.",
    )
    ray_address: str = Field(
        default="local",
        description="launcher ray: the cluster. 'local': a Ray instance started for the run on this machine; "
        "'auto': the cluster this machine belongs to (RAY_ADDRESS, or the one `ray start` started here); "
        "'host:port': a head node's address (6379 by default); 'ray://host:10001': through Ray Client.",
    )
    ray_resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="launcher ray: resources each worker needs besides its CPU (and GPU), e.g. {worker_slot: 1} to "
        "place one worker on each node started with `--resources '{\"worker_slot\": 1}'`.",
    )
    ray_placement: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="launcher ray: how workers spread over nodes (Ray's placement strategy): PACK fills a node "
        "first, SPREAD spreads them, STRICT_SPREAD puts each on a node of its own.",
    )
    max_failures: int = Field(
        default=1,
        ge=-1,
        description="launcher ray: how often Ray restarts the workers after one dies (a lost process or node); "
        "training continues from the run folder's newest complete checkpoint. 0: never; -1: without limit.",
    )
    ray_start_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="launcher ray: how long the cluster may take to start the workers before the run fails (the "
        "resources are held by other jobs, or the nodes are still starting).",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="'ddp': every process holds the whole 4-bit model and trains on its shard of the data. 'fsdp': "
        "FSDP-QLoRA through accelerate (FSDP1, one unit per decoder layer): weights, gradients and optimizer "
        "state are sharded across the processes; needs quantization.quant_storage_dtype equal to compute_dtype. "
        "Activation checkpointing is FSDP's own (training.gradient_checkpointing); fused_lora is not applied.",
    )
    num_machines: int = Field(default=1, ge=1, description="Machines taking part (each runs this flow's launcher).")
    machine_rank: int = Field(default=0, ge=0, description="This machine's rank, 0 .. num_machines-1.")
    main_process_ip: str | None = Field(
        default=None, description="Address of machine 0, where the processes meet (multi-machine runs)."
    )
    main_process_port: int = Field(default=29500, gt=0, lt=65536, description="Port on machine 0 for the meeting.")
    rdzv_endpoint: str | None = Field(
        default=None,
        description="host:port of a rendezvous endpoint (torchrun's c10d) instead of main_process_ip/port.",
    )

    @model_validator(mode="after")
    def _machines(self) -> DistributedConfig:
        if self.machine_rank >= self.num_machines:
            raise ValueError(
                f"distributed.machine_rank {self.machine_rank} must be below num_machines {self.num_machines}"
            )
        if self.num_machines > 1 and not (self.main_process_ip or self.rdzv_endpoint):
            raise ValueError("distributed.num_machines > 1 needs main_process_ip or rdzv_endpoint: set one")
        if self.main_process_ip and self.rdzv_endpoint:
            raise ValueError("distributed.main_process_ip and rdzv_endpoint are both set: choose one")
        if isinstance(self.num_processes, int) and self.num_processes < 1:
            raise ValueError("distributed.num_processes must be 1 or more, or 'auto'")
        if self.launcher == "ray":
            if self.num_processes == "auto":
                raise ValueError("distributed.num_processes: launcher ray needs the number of workers, not 'auto'")
            torchrun_only = [k for k in ("main_process_ip", "rdzv_endpoint") if getattr(self, k)]
            if self.num_machines > 1 or torchrun_only:
                raise ValueError(
                    f"distributed.{', '.join(torchrun_only or ['num_machines'])}: torchrun's; with launcher ray the "
                    "cluster places the workers (num_processes) on its nodes"
                )
        return self


class PruningConfig(Section):
    """A sweep's early stopping of hopeless trials with Optuna's pruners, on the eval loss a trial reports while it
    trains: the `pruning` section of a sweep space file (pipeline_config/sweep.py), here because a trial's finetune
    run reads it too."""

    pruner: Literal["none", "median", "percentile"] = Field(
        default="none",
        description="'median': stop a trial whose eval loss is worse than the median of earlier trials' at the same "
        "step (optuna MedianPruner); 'percentile': worse than `percentile` (PercentilePruner); 'none': never.",
    )
    eval_every_steps: int = Field(
        default=10, gt=0, description="A trial computes its eval loss every this many optimizer steps."
    )
    eval_rows: int = Field(default=32, gt=0, description="Held-out rows of that eval loss (the first ones).")
    n_startup_trials: int = Field(
        default=1, ge=0, description="Never prune until this many trials have completed (they set the bar)."
    )
    n_warmup_steps: int = Field(default=0, ge=0, description="Never prune a trial before this optimizer step.")
    percentile: float = Field(
        default=25.0, gt=0, lt=100, description="'percentile' pruner: keep trials in the best this many percent."
    )


class PipelineConfig(Section):
    """Everything one fine-tuning run needs."""

    model: ModelConfig
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig, description="4-bit loading.")
    lora: LoraAdapterConfig = Field(default_factory=LoraAdapterConfig, description="LoRA adapter.")
    data: DataConfig
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer set-up.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Training arguments.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Evaluation.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow model registry.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Several processes / machines (DDP or FSDP-QLoRA)."
    )
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="DPO / KTO settings (training.method dpo or kto)."
    )
    grpo: GrpoConfig = Field(default_factory=GrpoConfig, description="GRPO settings (training.method grpo).")

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        problems = []
        t, q = self.training, self.quantization
        if t.fp16 and q.compute_dtype == "bfloat16":
            problems.append("training.fp16 is true but quantization.compute_dtype is bfloat16: use one dtype")
        if t.bf16 and q.compute_dtype == "float16":
            problems.append("training.bf16 is true but quantization.compute_dtype is float16: use one dtype")
        if (
            self.data.format == "text"
            and self.evaluation.task_metric == "exact_match"
            and not self.data.response_template
        ):
            problems.append(
                "evaluation.task_metric is exact_match but data.format 'text' has no data.response_template to split "
                "prompt from answer: set one or use task_metric: none"
            )
        if t.device == "cpu":
            problems += cuda_only_problems(self)
        if self.distributed.strategy == "fsdp":
            problems += fsdp_problems(self)
        if t.completion_only_loss and self.data.format in ("text", "messages"):
            problems.append(
                f"training.completion_only_loss needs prompt/completion data, but data.format is {self.data.format!r}"
            )
        problems += stage_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_flat_dict(self) -> dict[str, Any]:
        """All resolved values as {'section.key': value} (for MLflow params)."""
        return _flatten(self.model_dump(mode="json"))


def stage_problems(cfg: PipelineConfig) -> list[str]:
    """A method with data it cannot train on, or settings only another method uses."""
    method, t = cfg.training.method, cfg.training
    problems = []
    formats = METHOD_DATA_FORMATS[method]
    if cfg.data.format != "auto" and cfg.data.format not in formats:
        problems.append(
            f"training.method {method} trains on data.format {' or '.join(formats)}, not {cfg.data.format!r}"
        )
    if method != "sft":
        sft_only = [name for name in ("completion_only_loss", "assistant_only_loss") if getattr(t, name)]
        if sft_only:
            problems.append(f"training.{', '.join(sft_only)}: SFT settings; training.method is {method}")
        if cfg.distributed.strategy == "fsdp":
            problems.append(f"distributed.strategy fsdp is SFT's; training.method {method} runs with ddp")
    if cfg.preference.policy_rejected is not None and method != "dpo":
        problems.append(f"preference.policy_rejected is for DPO pairs' rejected answers; training.method is {method}")
    if method == "kto" and isinstance(cfg.preference.loss_type, list):
        problems.append("preference.loss_type: KTO takes one loss_type (kto or apo_zero_unpaired), not a list")
    if method == "grpo":
        batch = t.per_device_train_batch_size * t.gradient_accumulation_steps
        if batch % cfg.grpo.num_generations:
            problems.append(
                f"grpo.num_generations ({cfg.grpo.num_generations}) must divide per_device_train_batch_size x "
                f"gradient_accumulation_steps ({batch}): each prompt's completions are one group of a batch"
            )
    return problems


def fsdp_problems(cfg: PipelineConfig) -> list[str]:
    """Settings FSDP-QLoRA cannot shard or run with."""
    q, t, problems = cfg.quantization, cfg.training, []
    compute = q.compute_dtype
    if compute == "auto":  # FSDP trains in mixed precision: auto is its dtype (qlora/model.py settles it)
        compute = "bfloat16" if t.bf16 else "float16" if t.fp16 else compute
    if compute != "auto" and q.quant_storage_dtype != compute:
        problems.append(
            f"distributed.strategy 'fsdp' shards the 4-bit weights only when they are stored in the compute dtype, but "
            f"quantization.quant_storage_dtype is {q.quant_storage_dtype!r}: set quant_storage_dtype: {compute}"
        )
    if not (t.bf16 or t.fp16):
        problems.append(
            "distributed.strategy 'fsdp' trains in mixed precision (FSDP casts the sharded weights for each layer): "
            "set training.bf16: true (with quantization.compute_dtype bfloat16)"
        )
    if cfg.lora.upcast_base_to_fp32:
        problems.append(
            "distributed.strategy 'fsdp' needs one dtype per sharded layer, but lora.upcast_base_to_fp32 is true: set "
            "it to false"
        )
    if t.compile_layers:
        problems.append(
            "distributed.strategy 'fsdp' wraps decoder layers in FSDP units: set training.compile_layers: false"
        )
    if t.gradient_checkpointing_layers is not None:
        problems.append(
            "distributed.strategy 'fsdp' checkpoints every decoder layer (FSDP's activation checkpointing), but "
            "training.gradient_checkpointing_layers is set: drop it"
        )
    return problems


def cuda_only_problems(cfg: PipelineConfig) -> list[str]:
    """Training options that only work on CUDA (checked against the device the run will really use)."""
    t, problems = cfg.training, []
    if cfg.distributed.strategy == "fsdp":
        problems.append(
            "distributed.strategy 'fsdp' needs CUDA GPUs (accelerate shards models only on accelerators), and this "
            "run is on the CPU: use strategy ddp"
        )
    if t.optim.startswith("paged_"):
        problems.append(f"training.optim {t.optim!r} needs CUDA, and this run is on the CPU: use adamw_torch")
    if t.fp16:
        problems.append("training.fp16 needs CUDA, and this run is on the CPU: use bf16 or neither")
    if t.attention == "varlen_flash":
        problems.append("training.attention 'varlen_flash' needs CUDA, and this run is on the CPU: use auto or sdpa")
    if t.activation_offloading:
        problems.append("training.activation_offloading needs CUDA (pinned host memory and streams): set it to false")
    if t.liger_kernels is True:
        problems.append("training.liger_kernels needs CUDA (Triton), and this run is on the CPU: use auto or false")
    return problems


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat
