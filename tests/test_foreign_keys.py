"""A config file of the other command (a training TOML given to evaluate_mia.py, and back) is named as such."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from library.config import load_config
from library.errors import ConfigError
from library.eval.config import EvalConfig
from library.foreign_keys import SiblingKeys
from library.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
PAIRS = [(EvalConfig, TrainConfig), (TrainConfig, EvalConfig)]


@pytest.mark.parametrize("cls,sibling", PAIRS, ids=["eval", "train"])
def test_sibling_keys_are_options_of_the_other_command_only(cls, sibling):
    """Each key names the other command's file for sure: its option, not this one's (nor an sd-scripts key here)."""
    keys = cls.SIBLING_KEYS.keys
    assert keys <= set(typing.get_type_hints(sibling)) - set(typing.get_type_hints(cls))
    assert not keys & set(getattr(cls, "FOREIGN_KEYS", {}))


def test_a_training_toml_given_to_the_evaluation_is_named_as_one():
    path = REPO / "configs" / "tiny" / "smp_lora.toml"
    with pytest.raises(ConfigError) as error:
        load_config(EvalConfig, path)
    message = str(error.value)
    assert f"{path} is a config file of train_*.py" in message
    assert "'network_dim'" in message and "--network_weights" in message and "--split_manifest" in message
    assert "did you mean" not in message  # no hints that send a user to unrelated evaluation keys


def test_an_evaluation_toml_given_to_training_is_named_as_one(tmp_path):
    path = tmp_path / "eval.toml"
    path.write_text('attacks = ["loss"]\ntimesteps = [100]\nseed = 3\n')
    with pytest.raises(ConfigError, match=r"eval\.toml is a config file of evaluate_mia\.py \('attacks', 'timesteps' "
                                           r"are its options"):
        load_config(TrainConfig, path)


def test_unknown_keys_of_no_other_command_keep_their_hints(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("network_dmi = 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'network_dmi' \(did you mean 'network_dim'\?\)"):
        load_config(TrainConfig, path)


def test_the_message_lists_at_most_four_keys():
    sibling = SiblingKeys("other.py", frozenset("abcdef"), "use other.py")
    assert sibling.error(Path("x.toml"), ["z"]) is None
    message = str(sibling.error(Path("x.toml"), list("zabcdef")))
    assert message == "x.toml is a config file of other.py ('a', 'b', 'c', 'd' ... are its options, not this " \
                      "command's): use other.py"


def test_a_config_class_without_sibling_keys_is_unchanged(tmp_path):
    @dataclasses.dataclass
    class Plain:
        seed: int = 0

    path = tmp_path / "c.toml"
    path.write_text("network_dim = 8\n")
    with pytest.raises(ConfigError, match="unknown key 'network_dim'"):
        load_config(Plain, path)
