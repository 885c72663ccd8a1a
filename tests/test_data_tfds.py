"""The TFDS reader, with TFDS' own mock data and a local builder (no download)."""

import pathlib

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from gemma4_keras.data import DataError, load_conversations, media
from gemma4_keras.data.records import parse_tfds_path

CHATS = [
    {
        "messages": {"role": ["user", "assistant"], "content": ["Hi", "Hello"]},
        "topic": "greeting",
    },
    {
        "messages": {
            "role": ["system", "user", "model"],
            "content": ["Be brief.", "2+2?", "4"],
        },
        "topic": "math",
    },
    {"messages": {"role": ["user", "bot"], "content": ["x", "y"]}, "topic": "bad"},
]


class Gemma4KerasTestChats(tfds.core.GeneratorBasedBuilder):
    """A local chat dataset: a sequence of {role, content} messages per example."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        messages = tfds.features.Sequence(
            {"role": tfds.features.Text(), "content": tfds.features.Text()}
        )
        features = tfds.features.FeaturesDict(
            {"messages": messages, "topic": tfds.features.Text()}
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield from enumerate(CHATS)


def _cfg(path, **kwargs):
    fields = {
        "path": path,
        "format": "auto",
        "fields": {},
        "on_error": "raise",
        "system_prompt": "",
        "tfds_data_dir": "",
    }
    fields.update(kwargs)
    return ml_collections.ConfigDict(fields)


def test_parse_tfds_path():
    assert parse_tfds_path("tfds:imdb_reviews:train") == ("imdb_reviews", "train")
    assert parse_tfds_path("tfds:glue/sst2:validation[:10%]") == (
        "glue/sst2",
        "validation[:10%]",
    )
    with pytest.raises(DataError, match="expected 'tfds:name"):
        parse_tfds_path("tfds:imdb_reviews")


def test_tfds_mock_data_with_field_mapping_and_class_labels():
    cfg = _cfg(
        "tfds:imdb_reviews:train",
        fields={"prompt": "text", "completion": "label"},
        on_error="skip",
    )
    with tfds.testing.mock_data(num_examples=6):
        conversations, stats = load_conversations(cfg)
    assert stats["records"] == 6 and stats["valid"] + stats["skipped"] == 6
    assert conversations, stats
    assert {c.messages[-1]["content"] for c in conversations} <= {"neg", "pos"}
    assert conversations[0].source.startswith("tfds:imdb_reviews:train[")


def test_local_builder_messages_and_errors_with_record_index(tmp_path):
    path = "tfds:gemma4_keras_test_chats:train"
    with pytest.raises(DataError) as info:
        load_conversations(_cfg(path, tfds_data_dir=str(tmp_path)))
    assert str(info.value).startswith(f"{path}[2]: message 1: unknown role 'bot'")
    conversations, stats = load_conversations(
        _cfg(path, tfds_data_dir=str(tmp_path), on_error="skip")
    )
    assert stats["skipped"] == 1
    assert conversations[0].messages == [
        {"role": "user", "content": "Hi"},
        {"role": "model", "content": "Hello"},
    ]
    assert conversations[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert conversations[1].source == f"{path}[1]"


def test_unknown_tfds_dataset_is_a_data_error(tmp_path):
    with pytest.raises(
        DataError, match="tfds:no_such_dataset_xyz:train: cannot load the TFDS split"
    ):
        load_conversations(
            _cfg("tfds:no_such_dataset_xyz:train", tfds_data_dir=str(tmp_path))
        )


def test_tfds_data_dir_is_set_from_the_command_line(tmp_path, capsys):
    from gemma4_keras import cli

    configs = pathlib.Path(__file__).resolve().parent.parent / "configs"
    data_dir, out = tmp_path / "tfds", tmp_path / "split"
    code = cli.main(
        [
            "gemma4-keras",
            "data",
            "split",
            f"--config={configs}/tiny.py",
            "--config.data.path=tfds:gemma4_keras_test_chats:train",
            f"--config.data.tfds_data_dir={data_dir}",
            "--config.data.on_error=skip",
            f"--out={out}",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (data_dir / "gemma4_keras_test_chats").is_dir()  # built where it says
    lines = [*(out / "train.jsonl").open(), *(out / "holdout.jsonl").open()]
    assert len(lines) == 2  # the valid two of the three chats


def _pixels(index):
    rng = np.random.default_rng(index)
    return rng.integers(0, 256, (30 + 10 * index, 40, 3), np.uint8)


class Gemma4KerasTestImages(tfds.core.GeneratorBasedBuilder):
    """A local image classification set: an RGB image and a class label."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["cat", "dog"]),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(2):
            yield i, {"image": _pixels(i), "label": i}


def test_tfds_images_become_image_parts_in_memory(tmp_path, monkeypatch):
    """An `Image` feature reaches the media layer as an inline PNG (no file is
    written beside the data) with the pixels TFDS stored; the label answers."""
    from PIL import Image

    from gemma4_keras.testing import media as media_files

    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "tfds"
    path = "tfds:gemma4_keras_test_images:train"
    conversations, stats = load_conversations(
        _cfg(
            path,
            fields={"image": "image", "completion": "label"},
            system_prompt="Cat or dog?",
            tfds_data_dir=str(data_dir),
        )
    )
    assert stats["valid"] == 2
    for i, c in enumerate(conversations):
        assert [m["role"] for m in c.messages] == ["system", "user", "model"]
        assert c.messages[2]["content"] == ["cat", "dog"][i]
        (record,) = c.messages[1]["media"]
        assert record["source"] == "inline" and record["height"] == 30 + 10 * i
        assert record["soft_tokens"] == media.image_soft_tokens(30 + 10 * i, 40)
        # The same pixels as the array saved to a file and read from there.
        file = media_files.write_image(tmp_path / f"{i}.png", 1, 1)
        Image.fromarray(_pixels(i)).save(file)
        from_file = media.describe_part({"type": "image", "path": file})
        np.testing.assert_array_equal(
            media.image_features(record)[0], media.image_features(from_file)[0]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.png", "1.png", "tfds"]


def test_a_prompt_goes_after_the_image(tmp_path):
    record = {"img": media.image_data_uri(_pixels(0)), "q": "Which?", "a": "cat"}
    from gemma4_keras.data.records import record_to_conversation

    fields = {"image": "img", "prompt": "q", "completion": "a"}
    c = record_to_conversation(record, "x", "auto", fields)
    assert c.messages[0]["content"] == "<|image|>Which?"
    with pytest.raises(ValueError, match="missing field 'q'"):
        record_to_conversation({"a": "cat"}, "x", "auto", fields)
