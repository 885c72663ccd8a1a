"""Checkpoints the package writes itself: the tiny Gemma 4 model of the
default run and the tests, in Hugging Face format; and what the tests share
over them (`variants`: the table of tiny architectures, cached KerasHub
backbones; `media`: image and WAV files).

It sits below `model/` in the layering: `model.presets` resolves the `tiny`
preset by writing one of these checkpoints.
"""
