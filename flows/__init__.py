"""The entry points: the flow (finetune.py) wires the steps in `tasks/`; the CLI and the deployments start it."""
