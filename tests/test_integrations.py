"""Every private name of another library that qlora/integrations/ relies on still exists with the shape it expects.

An upgrade that renames or reshapes one fails here, loudly, with the module and the name, before it silently changes
a run. (Behaviour is tested elsewhere: atomic checkpoints and resume in test_resume.py, fused LoRA = peft and packed =
per-document loss in test_fast_path.py, the served model's input check in test_serving.py.)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil

import pytest
from packaging.version import Version

from qlora import integrations
from qlora.integrations import fused_lora, liger, mlflow_names, mlflow_pyfunc, trainer
from tasks import prefect_server, stopping

# Every module of qlora/integrations/, and Prefect's internals, which live beside the steps (qlora/ imports no
# Prefect): tasks/prefect_server.py, tasks/stopping.py
MODULES = [
    *(importlib.import_module(f"qlora.integrations.{m.name}") for m in pkgutil.iter_modules(integrations.__path__)),
    prefect_server,
    stopping,
]


def _params(func) -> list[str]:
    return list(inspect.signature(func).parameters)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_each_integration_names_the_versions_it_was_written_for(module):
    assert module.WRITTEN_FOR, module.__name__
    for package, version in module.WRITTEN_FOR.items():
        Version(version)  # a real version string
        try:
            installed = Version(importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:  # liger-kernel (a GPU extra); the GPU site's stripped mlflow
            continue
        # Same major version: a new major is an upgrade someone must re-check these overrides against.
        assert installed.major == Version(version).major, f"{module.__name__}: {package} {installed} vs {version}"


def test_trainer_private_hooks():
    from transformers import Trainer
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert _params(Trainer._save_checkpoint) == ["self", "model", "trial"]
    assert _params(Trainer._load_from_checkpoint)[:3] == ["self", "resume_from_checkpoint", "model"]
    assert _params(Trainer._get_output_dir) == ["self", "trial"]
    # the per-layer flag CheckpointFirstLayers sets: read by the wrapped forward of every decoder layer
    assert GradientCheckpointingLayer.gradient_checkpointing is False
    assert "self.gradient_checkpointing" in inspect.getsource(inspect.getmodule(GradientCheckpointingLayer))
    # Where SFTTrainer overrides a hook we wrap, it must still hand over to Trainer's (ours runs around both).
    from trl import SFTTrainer

    for name in ("_save_checkpoint", "_load_from_checkpoint", "_get_output_dir"):
        ours = getattr(SFTTrainer, name)
        if ours is not getattr(Trainer, name):
            assert _params(ours) == _params(getattr(Trainer, name)), name
            assert f"super().{name}(" in inspect.getsource(ours), name
    assert issubclass(trainer.PipelineSFTTrainer, SFTTrainer)


def test_one_process_one_gpu_switch():
    from transformers import TrainingArguments
    from transformers.training_args import ParallelMode

    assert "_n_gpu" in inspect.getsource(TrainingArguments.n_gpu.fget)
    assert "NOT_DISTRIBUTED" in inspect.getsource(TrainingArguments.parallel_mode.fget)
    assert ParallelMode.NOT_DISTRIBUTED.value == "not_distributed"


def test_attention_interface():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    assert callable(AttentionInterface.register)
    assert _params(sdpa_attention_forward)[:5] == ["module", "query", "key", "value", "attention_mask"]
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=8)
    assert hasattr(config, "_attn_implementation")  # toggled while training


def test_peft_lora_layer_attributes_used_by_the_fused_forward(tiny_llama_dir):
    import torch
    from bitsandbytes.nn import Linear4bit
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    from pipeline_config.schema import LoraAdapterConfig, ModelConfig, QuantizationConfig
    from qlora.model import build_lora_config, load_quantized_model
    from qlora.model_source import resolve_model_source

    base = load_quantized_model(
        resolve_model_source(ModelConfig(name_or_path=str(tiny_llama_dir))),
        QuantizationConfig(compute_dtype="float32"),
        "cpu",
    )
    model = get_peft_model(base, build_lora_config(LoraAdapterConfig(r=4)))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(isinstance(m.get_base_layer(), Linear4bit) for m in layers)
    for attr in (
        "disable_adapters",
        "merged",
        "active_adapters",
        "lora_A",
        "lora_B",
        "lora_variant",
        "lora_dropout",
        "scaling",
        "base_layer",
    ):
        assert hasattr(layers[0], attr), attr
    assert fused_lora.fuse_lora_layers(model) == len(layers)
    x = torch.randn(1, 3, 64)
    assert layers[0](x).shape == (1, 3, layers[0].out_features)


def test_peft_param_wrapper_internals_the_expert_lora_patch_replaces():
    import torch
    from peft.tuners.lora import layer
    from torch.nn.utils import parametrize

    wrapper = layer.ParamWrapper
    assert _params(wrapper._activate_lora) == ["self", "active_adapters"]
    assert _params(wrapper._remove_parametrizations) == ["self"]
    assert callable(wrapper.get_base_layer) and callable(wrapper.get_delta_factors)
    assert issubclass(layer._LoraParameterProxy, torch.nn.Module) and issubclass(
        layer._LoraFactorsProxy, torch.nn.Module
    )
    assert isinstance(parametrize._cache, dict) and callable(parametrize.cached)
    # The bug the patch works around is still there: peft's removal looks for one of the two proxy classes only.
    # When this fails, peft has fixed it: re-check qlora/integrations/expert_lora.py and drop what is fixed.
    assert "isinstance(module, _LoraParameterProxy)" in inspect.getsource(layer)


def test_transformers_loading_functions_the_expert_quantization_wraps():
    import transformers.core_model_loading as loading
    import transformers.modeling_utils as modeling

    assert _params(loading.set_param_for_module) == [
        "model",
        "target_name",
        "param_value",
        "loading_info",
        "hf_quantizer",
    ]
    assert _params(modeling.caching_allocator_warmup) == ["model", "expanded_device_map", "hf_quantizer"]
    # both are called by their module-level name, which is what the wrapper replaces for one load
    assert "set_param_for_module(" in inspect.getsource(loading.convert_and_load_state_dict_in_model)
    assert "caching_allocator_warmup(" in inspect.getsource(modeling.PreTrainedModel._load_pretrained_model)


def test_liger_patch_target_exists():
    from transformers.models.llama import modeling_llama

    assert callable(modeling_llama.apply_rotary_pos_emb)
    with liger.restore_llama_rope():
        modeling_llama.apply_rotary_pos_emb = None
    assert callable(modeling_llama.apply_rotary_pos_emb)


def test_mlflow_reads_the_skip_flag():
    import mlflow.pyfunc.model

    from qlora.serving import QLoRAChatModel

    source = inspect.getsource(mlflow.pyfunc.model.PythonModel.__init_subclass__)
    assert mlflow_pyfunc.SKIP_FLAG in source, "MLflow no longer reads _skip_type_hint_validation"
    assert getattr(QLoRAChatModel, mlflow_pyfunc.SKIP_FLAG) is True
    # MLflow left predict as written (its validating wrapper would carry __wrapped__).
    assert not hasattr(QLoRAChatModel.__dict__["predict"], "__wrapped__")


def test_module_compile_keeps_its_compiled_call_where_uncompile_drops_it():
    import torch

    layer = torch.nn.Linear(2, 2)
    assert layer._compiled_call_impl is None
    layer.compile()
    assert layer._compiled_call_impl is not None  # what __call__ runs instead of the eager forward
    layer._compiled_call_impl = None
    assert layer(torch.ones(1, 2)).shape == (1, 2)


def test_mlflow_name_and_uri_rules():
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    from mlflow.utils.validation import _validate_model_name

    assert _params(_validate_model_name) == ["model_name"]
    assert callable(_tracking_store_registry.get_store_builder) and "sqlite" in _tracking_store_registry._registry
    assert mlflow_names.registered_model_name_problem("team/orders:v1") is not None
    assert mlflow_names.registered_model_name_problem("orders-v1") is None
    assert mlflow_names.tracking_uri_problem("mlfow://x") is not None and not mlflow_names.tracking_uri_problem("/x")


# The command line tasks/prefect_server.py repeats (with two Popen options added): a change to Prefect's own is an
# upgrade to re-read, so its source is pinned.
PREFECT_UVICORN_COMMAND_SHA256 = "ade91366329f9f14"


def test_prefect_temporary_server_internals():
    import hashlib

    from prefect.server.api.server import SubprocessASGIServer

    source = inspect.getsource(SubprocessASGIServer._run_uvicorn_command)
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == PREFECT_UVICORN_COMMAND_SHA256, (
        "Prefect changed how it starts its temporary server: update tasks/prefect_server.py to match"
    )
    assert isinstance(SubprocessASGIServer._instances, dict)
    running = SubprocessASGIServer._instances.pop(None, None)  # another test's temporary server, put back below
    try:
        server = prefect_server._server_class()()  # registered as the ephemeral instance, which Prefect reuses
        assert SubprocessASGIServer() is server and type(server) is not SubprocessASGIServer
    finally:
        SubprocessASGIServer._instances.pop(None, None)
        if running is not None:
            SubprocessASGIServer._instances[None] = running
    assert _params(SubprocessASGIServer.start) == ["self", "timeout"]


def test_prefect_cancellation_intent_and_termination_signal():
    import signal

    import prefect.utilities.engine as engine
    from prefect._internal import control_listener
    from prefect.exceptions import TerminationSignal

    assert control_listener.get_intent() is None and not stopping.cancellation_requested()
    assert "cancel" in str(control_listener.Intent)
    assert TerminationSignal(signal.SIGTERM).signal == signal.SIGTERM
    # the control channel accepts an intent only while the installed SIGTERM handler is this module-level name
    check = inspect.getsource(engine.commit_control_intent_and_ack)
    assert "signal.getsignal(signal.SIGTERM) is not _prefect_sigterm_handler" in check
    assert callable(engine._prefect_sigterm_handler) and engine._prefect_sigterm_bridge_lock is not None
    with stopping.stop_on_signals(10):
        assert signal.getsignal(signal.SIGTERM) is engine._prefect_sigterm_handler  # ours, seen as Prefect's
    assert engine._prefect_sigterm_handler.__module__ == "prefect.utilities.engine"  # put back


def test_bitsandbytes_cpu_repacking_switch_is_what_its_forward_reads(tiny_llama_dir):
    """`no_inference_repacking` turns off the in-place conversion of 4-bit weights to bitsandbytes' CPU inference
    layout through the attribute `Linear4bit.forward` reads; forced on (as on an AVX512-BF16 CPU), a no-grad eval
    forward inside the block leaves the weights as training needs them, and the switch is back afterwards."""
    import torch
    from bitsandbytes.nn import Linear4bit

    from pipeline_config.schema import ModelConfig, QuantizationConfig
    from qlora.integrations.bnb_cpu import REPACKING_SWITCH, no_inference_repacking
    from qlora.model import load_quantized_model
    from qlora.model_source import resolve_model_source

    assert REPACKING_SWITCH in inspect.getsource(Linear4bit.forward)
    assert "packing_format_for_cpu" in inspect.getsource(Linear4bit.forward)
    model = load_quantized_model(
        resolve_model_source(ModelConfig(name_or_path=str(tiny_llama_dir))),
        QuantizationConfig(compute_dtype="float32"),
        "cpu",
    )
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(hasattr(m, REPACKING_SWITCH) for m in layers)
    for layer in layers:
        setattr(layer, REPACKING_SWITCH, True)
    before = {id(m): m.weight.data.clone() for m in layers}
    model.eval()
    with no_inference_repacking(model), torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    for layer in layers:
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(layer.weight.data, before[id(layer)])
        assert getattr(layer, REPACKING_SWITCH) is True
