import pytest

import config


def test_overrides_are_typed_and_presets_apply():
    cfg = config.load(None, ["train.lr=1e-5", "train.steps=3", "simulator.rules.patience=2", "algo=grpo"])
    assert cfg["train"]["lr"] == 1e-5 and cfg["train"]["steps"] == 3
    assert cfg["simulator"]["rules"]["patience"] == 2
    assert cfg["stpr"]["mode"] == "outcome" and cfg["aopsd"]["coef"] == 0.0   # the grpo preset
    # a preset's keys define it: an override that contradicts one is an error (it would make grpo another
    # algorithm under grpo's name), one that agrees is accepted
    with pytest.raises(config.ConfigError, match="algo=grpo is defined by aopsd.coef=0.0"):
        config.load(None, ["algo=grpo", "aopsd.coef=0.5"])
    assert config.load(None, ["algo=grpo", "stpr.mode=outcome"])["stpr"]["mode"] == "outcome"
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
        config.load(None, override.split())
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


# ----------------------------------------------------------------------------- ranges (issue: every bad value)

@pytest.mark.parametrize("override, key, allowed", [
    ("train.lr=-1", "train.lr", "> 0"),
    ("rollout.temperature=-1", "rollout.temperature", ">= 0"),
    ("simulator.temperature=-0.5", "simulator.temperature", ">= 0"),
    ("train.steps=0", "train.steps", ">= 1"),
    ("rollout.top_p=1.5", "rollout.top_p", "(0, 1]"),
    ("stpr.eps_low=1.0", "stpr.eps_low", "[0, 1)"),
    ("aopsd.alpha=1", "aopsd.alpha", "(0, 1)"),
    ("aopsd.ema_decay=2", "aopsd.ema_decay", "[0, 1]"),
    ("simulator.max_turns=0", "simulator.max_turns", ">= 1"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens", ">= 1"),
    ("learn_to_ask.group_size=1", "learn_to_ask.group_size", ">= 2"),
    ("learn_to_ask.test_fraction=1", "learn_to_ask.test_fraction", "[0, 1)"),
    ("train.group_size=1 stpr.mode=direction", "train.group_size", ">= 2"),
    ("rollout.max_new_tokens=4096", "rollout.max_new_tokens", "< rollout.max_context"),
])
def test_out_of_range_values_name_the_key_and_the_range(override, key, allowed):
    import learn_to_ask
    with pytest.raises(config.ConfigError) as err:
        config.load(None, override.split(), section=learn_to_ask.SECTION if key.startswith("learn_to_ask") else None)
    message = str(err.value)
    assert "\n" not in message and f"'{key}'" in message and allowed in message


def test_a_group_of_one_is_fine_where_no_outcome_advantage_is_used():
    assert config.load(None, ["train.group_size=1", "algo=distill"])["train"]["group_size"] == 1
    assert config.load(None, ["train.group_size=1", "stpr.mode=additive"])["train"]["group_size"] == 1


def test_every_default_is_in_range():
    cfg = config.load()
    for key, allowed in config.RANGES.items():
        assert config.in_range(config.get(cfg, key), allowed), key


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  lr: [1e-5\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(str(bad))
    message = str(err.value)
    assert str(bad) in message and "line" in message and "column" in message and "\n" not in message


@pytest.mark.parametrize("args", [["train.lr=-1"], ["rollout.temperature=-1"], ["train.steps=0"],
                                  ["train.group_size=1", "stpr.mode=direction"], ["--config", "BAD"]])
def test_savpo_cli_refuses_before_writing_anything(tmp_path, args):
    import savpo
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3\n")
    args = [str(bad) if a == "BAD" else a for a in args]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as leave:
        savpo.main([*args, f"out_dir={out}", "--resume"])
    assert str(leave.value).startswith("config error:") and "\n" not in str(leave.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("module, argv", [("eval", ["--n", "0"]), ("bench", ["--dialogues", "-3"]),
                                          ("learn_to_ask.policy", ["train", "learn_to_ask.lr=0"])])
def test_other_entry_points_refuse_bad_values_in_one_sentence(module, argv, capsys, monkeypatch):
    import importlib
    import sys
    mod = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as leave:
        mod.main(argv) if module != "bench" else mod.main()
    said = (str(leave.value) if not isinstance(leave.value.code, int) else capsys.readouterr().err).strip()
    assert said and ("must be an integer >= 1" in said or "'learn_to_ask.lr'" in said)


def test_the_comparisons_shared_overrides_never_redefine_a_preset(tmp_path):
    """`compare.py stpr.mode=direction` trains savpo and refine with SAVPO's STPR; grpo keeps its outcome
    advantages (before, the shared override made grpo train exactly as refine)."""
    import compare
    shared = ["stpr.mode=direction", "train.lr=3e-4"]
    modes = {algo: config.load(None, [*compare.preset_overrides(shared, algo), f"algo={algo}"])["stpr"]["mode"]
             for algo in config.PRESETS}
    assert modes == {"savpo": "direction", "grpo": "outcome", "distill": "direction", "refine": "direction"}
    # a YAML file is shared settings too: the preset wins over it
    path = tmp_path / "c.yaml"
    path.write_text("stpr:\n  mode: direction\n")
    assert config.load(str(path), ["algo=grpo"])["stpr"]["mode"] == "outcome"
