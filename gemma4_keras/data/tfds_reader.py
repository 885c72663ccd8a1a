"""Reads a TFDS split as plain records: `data.path = "tfds:name[/config]:split"`.

Each example becomes a flat dict: text is decoded, a `ClassLabel` becomes its
name, nested features get dotted keys ("answers.text"), and a sequence of
{"role", "content"} dicts becomes a list of messages. `data.fields` then maps
the canonical keys (prompt, completion, system / instruction, input, output /
messages) onto these names, e.g. `{"prompt": "text", "completion": "label"}`.
TensorFlow Datasets is imported only when a TFDS path is used.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np

from gemma4_keras.data.records import DataError


def parse_tfds_path(path: str) -> tuple[str, str]:
    """Splits "tfds:name[/config]:split" into (name, split).

    Example:
        >>> parse_tfds_path("tfds:glue/sst2:train[:10%]")
        ('glue/sst2', 'train[:10%]')
    """
    body = path.removeprefix("tfds:")
    name, sep, split = body.partition(":")
    if not sep or not name or not split:
        raise DataError(
            f"data.path={path!r}: expected 'tfds:name[/config]:split', e.g. 'tfds:imdb_reviews:train'"
        )
    return name, split


def _plain(value: Any, feature: Any) -> Any:
    import tensorflow_datasets as tfds  # heavy (TensorFlow); only TFDS sources need it

    if isinstance(feature, tfds.features.ClassLabel):
        return feature.int2str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_plain(v, None) for v in value.tolist()] if value.ndim else value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def flatten_example(example: dict, features: Any, prefix: str = "") -> dict:
    """Flattens one `tfds.as_numpy` example to {dotted name: python value}."""
    flat = {}
    for key, value in example.items():
        feature = features[key] if features is not None and key in features else None
        name = prefix + key
        if isinstance(value, dict):
            sub_features = getattr(feature, "feature", feature)
            inner = flatten_example(value, sub_features, name + ".")
            flat.update(inner)
            columns = [inner[name + "." + k] for k in value]
            if columns and all(
                isinstance(c, list) and len(c) == len(columns[0]) for c in columns
            ):
                flat[name] = [dict(zip(value, row)) for row in zip(*columns)]
        else:
            flat[name] = _plain(value, feature)
    return flat


def iter_tfds(path: str, data_dir: str = "") -> Iterator[tuple[str, dict]]:
    """Yields (source, flat record) for every example of the split."""
    import tensorflow_datasets as tfds  # heavy (TensorFlow); only TFDS sources need it

    name, split = parse_tfds_path(path)
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        builder.download_and_prepare()
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except Exception as e:  # TFDS raises many types; report them as data errors.
        # TFDS messages run to hundreds of lines (every known dataset name).
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise DataError(
            f"{path}: cannot load the TFDS split ({type(e).__name__}: {first}); "
            "check the name, split and data.tfds_data_dir"
        ) from e
    features = builder.info.features
    for index, example in enumerate(tfds.as_numpy(dataset)):
        yield f"tfds:{name}:{split}[{index}]", flatten_example(example, features)
