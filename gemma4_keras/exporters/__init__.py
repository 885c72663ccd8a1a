"""Exports: PEFT adapters, merged Hugging Face safetensors, KerasHub presets, GGUF."""
