"""Code that reaches into another library's private internals, all of it here.

Each module names the versions it was written against (`WRITTEN_FOR`) and tests/test_integrations.py checks, on the
installed versions, that every private name it relies on still exists with the shape it expects: an upgrade that
breaks one fails there, loudly, before it silently changes a run.

| module | library | what it overrides |
| --- | --- | --- |
| trainer.py | transformers Trainer, TRL SFTTrainer | `_save_checkpoint`, `_load_from_checkpoint`, `_get_output_dir`, |
| | | `_track_num_input_tokens`, `compute_loss` and `log` (metrics on the device); |
| | | the `gradient_checkpointing` flag of decoder layers |
| regional_compile.py | torch `nn.Module.compile` | drops `_compiled_call_impl` to run compiled layers eager again |
| attention.py | transformers | registers an attention function; toggles `config._attn_implementation` while training |
| fused_lora.py | peft LoRA layers over bitsandbytes Linear4bit | replaces each layer's `forward` on the instance |
| expert_loading.py | transformers' weight loading | wraps `core_model_loading.set_param_for_module`, skips |
| | | `modeling_utils.caching_allocator_warmup`, for one MoE load (experts to 4 bits as they arrive) |
| expert_lora.py | peft `ParamWrapper` over a 4-bit (parametrized) MoE expert weight | `_remove_parametrizations` and |
| | | `_activate_lora` (removes either LoRA proxy; drops torch's stale `parametrize._cache` entry) |
| liger.py | Liger kernels / transformers' Llama module | undoes Liger's module-wide RoPE patch (bench) |
| mlflow_pyfunc.py | MLflow pyfunc | `_skip_type_hint_validation` on the served model class |
| mlflow_names.py | MLflow | asks `_validate_model_name` and the tracking-store registry (the `validate` checks) |

Prefect's internals are used beside the steps, since nothing in qlora/ imports Prefect: tasks/prefect_server.py
(the temporary server, started to die with the run) and tasks/stopping.py (a cancellation's intent), each with its
`WRITTEN_FOR`, checked by the same test module.
"""
