"""Reference matching, the one fine-tuning engine: a changed student learns to reproduce the unchanged
model's hidden states (`engine`); LoRA adapters and the delta files they are saved as (`lora`)."""
