"""Checkpoints the package writes itself: the tiny Gemma 4 model of the
default run and the tests, in Hugging Face format; and what the tests share
over them (`variants`: the table of tiny architectures, cached KerasHub
backbones; `media`: image and WAV files).

It sits below `model/` in the layering: `model.presets` resolves the `tiny`
preset by writing one of these checkpoints.
"""


def train_step_state(model) -> tuple[list, list, list, list]:
    """The state Keras' JAX `model.train_step(state, data)` takes, as `fit`
    builds it: the values of the trainable, non-trainable, optimizer and
    metrics variables (build the optimizer first).

    Example:

        step = jax.jit(model.train_step, donate_argnums=0)
        logs, state = step(train_step_state(model), (batch,))
    """
    return tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
