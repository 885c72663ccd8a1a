"""The model: KerasHub bridge, layers, LoRA, NF4 quantisation, loss, presets."""
