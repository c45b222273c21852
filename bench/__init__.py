"""`qlora-flow bench`: the training benchmark, a developer tool beside the pipeline.

settings.py          what it can measure: architectures, batch geometry, variant names, BenchConfig (import-light)
cli.py               the `bench` command line (flows/cli.py adds it with `add_bench_command`)
run.py               run_bench: build model and data, run each variant, write bench.json/.md; the torchrun launch
models.py            random-weight models of a named architecture, the synthetic and bundled rows
flops.py             parameters a token meets, model FLOPs per token, the device's peak rate
memory.py            4-bit weight sizes, what a load allocates, freeing accelerator memory between runs
packing.py           the packed vs per-document loss check
variants.py          recipe / trl_best / project* configs and runners, run_variant, VariantResult
timing.py            the step timer and profile summary
unsloth_variants.py  the unsloth variants, run through unsloth_worker.py in a process of their own
report.py            the environment and the markdown table
long_context.py      `bench --max-context`: the longest single document the lean path trains on
"""
