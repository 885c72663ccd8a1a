"""The TFDS reader, with TFDS' own mock data and a local builder (no download)."""

import pathlib

import ml_collections
import pytest
import tensorflow_datasets as tfds

from gemma4_keras.data import DataError, load_conversations
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
