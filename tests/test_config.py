import pytest

import config


def test_overrides_are_typed_and_presets_apply():
    cfg = config.load(None, ["train.lr=1e-5", "train.steps=3", "simulator.rules.patience=2", "algo=grpo"])
    assert cfg["train"]["lr"] == 1e-5 and cfg["train"]["steps"] == 3
    assert cfg["simulator"]["rules"]["patience"] == 2
    assert cfg["stpr"]["mode"] == "outcome" and cfg["aopsd"]["coef"] == 0.0   # the grpo preset
    # a user override beats the preset
    assert config.load(None, ["algo=grpo", "aopsd.coef=0.5"])["aopsd"]["coef"] == 0.5
    # an int is accepted for a float key
    assert config.load(None, ["train.lr=1"])["train"]["lr"] == 1.0


@pytest.mark.parametrize("override, words", [
    ("train.lrr=1e-5", ["unknown config key 'train.lrr'"]),
    ("lr=1e-5", ["unknown config key 'lr'", "train.lr"]),
    ("train.steps=ten", ["train.steps", "int"]),
    ("simulator.appraiser=magic", ["simulator.appraiser", "lexical, llm, generative"]),
    ("algo=ppo", ["'algo'", "savpo, grpo, distill, refine"]),
    ("train.gradient_checkpointing=1", ["true or false"]),
    ("trainsteps", ["key.sub=value"]),
])
def test_bad_config_gives_one_clear_sentence(override, words):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, [override])
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_missing_config_file_and_save_roundtrip(tmp_path):
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(str(tmp_path / "nope.yaml"))
    cfg = config.load(None, ["train.steps=7"])
    config.save(cfg, str(tmp_path / "run"))
    again = config.load(str(tmp_path / "run" / "config.yaml"))
    assert again == cfg


def test_from_argv_splits_flags_and_overrides(tmp_path):
    cfg, flags = config.from_argv(["--resume", "train.steps=2", "--out", "x", "seed=3"])
    assert flags == {"resume": True, "out": "x"}
    assert cfg["train"]["steps"] == 2 and cfg["seed"] == 3
