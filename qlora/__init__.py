"""The plain functions of QLoRA fine-tuning: data, tokenizer, 4-bit model, training, evaluation, saving, tracking,
registry and run folders. No Prefect import (the steps in `tasks/` wrap these); tests call them directly. Code that
reaches into another library's internals lives in `qlora/integrations/`."""
