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


# ----------------------------------------------------------------------------- issue 32: every value a user can give

def test_the_documented_words_on_and_off_are_text_not_booleans(tmp_path):
    """YAML 1.1 reads on / off / yes / no as booleans: `rollout.compile=on`, documented, was refused as True."""
    assert config.load(None, ["rollout.compile=on"])["rollout"]["compile"] == "on"
    assert config.load(None, ["rollout.compile=off"])["rollout"]["compile"] == "off"
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  compile: off\n")
    assert config.load(str(path))["rollout"]["compile"] == "off"
    saved = tmp_path / "run"                     # and a saved run reads back as it was written
    config.save(config.load(None, ["rollout.compile=on"]), str(saved))
    assert config.load(str(saved / "config.yaml"))["rollout"]["compile"] == "on"
    with pytest.raises(config.ConfigError, match="must be true or false like its default False, got 'yes'"):
        config.load(None, ["train.gradient_checkpointing=yes"])


@pytest.mark.parametrize("override, words", [
    ("simulator.rules.patience=true", "must be an int like its default 4, got True"),   # not "true or false"
    ("seed=null", "'seed' is empty (null); give an int"),
    ("out_dir=null", "'out_dir' is empty (null)"),
    ("out_dir=", "'out_dir' is empty"),
    ("personas.domains=[]", "'personas.domains' is an empty list"),
    ("lora.target_modules=[]", "'lora.target_modules' is an empty list"),
    ("lora.target_modules=[1, 2]", "must be a list of texts"),
    ("personas.domains=[merchant_recruitment, merchant_recruitment]", "lists 'merchant_recruitment' twice"),
    ("personas.domains=[nope]", "names 'nope', which is no domain bank; allowed: broadband_switch"),
    ("train.lr=.inf", "'train.lr' is inf; allowed: a finite number"),
    ("simulator.rules=3", "'simulator.rules' is a section; set its keys one by one, e.g. simulator.rules.patience=4"),
])
def test_values_that_used_to_pass_and_crash_later_are_refused(override, words):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, [override])
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_key_twice_in_a_file_is_refused_with_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 3\n  lr: 1.0e-4\n  steps: 5\n")
    with pytest.raises(config.ConfigError, match=r"line 4, column 3 \(key 'steps' appears twice"):
        config.load(str(path))
    path.write_text("train:\n  lr: -1\n")      # a bad value from a file names the file
    with pytest.raises(config.ConfigError, match=f"'train.lr' \\(set in {path}\\) is -1"):
        config.load(str(path))


def test_config_flag_without_a_path_is_one_sentence():
    import savpo
    with pytest.raises(SystemExit, match="--config needs the path of a YAML file"):
        savpo.main(["--config"])


# the fuzz: any key (a real one, a section, a typo), any YAML value -> a config or one ConfigError sentence
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

FLAT = config._flatten(config.load())
KEYS = st.sampled_from(sorted(FLAT) + ["train", "simulator.rules", "train.lrr", "", "a..b", "seed.x", "ü.ß"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 12, 10 ** 12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["on", "off", "yes", "no", "~", "null", "1e-5", "1e3", ".nan", "[", "{a: 1",
                                     "merchant_recruitment", "auto", "lexical"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


def _holds_like_its_default(cfg):
    """Every key of an accepted config has its default's kind: no null, no empty list, a finite number."""
    import math
    for key, default in FLAT.items():
        value = config.get(cfg, key)
        assert value is not None, key
        assert isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, float)), key
        if isinstance(value, float):
            assert math.isfinite(value), key
        if isinstance(default, list) and default:
            assert value and all(type(x) is type(default[0]) for x in value), key


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=3))
def test_fuzz_overrides_give_a_config_or_one_sentence(pairs):
    import yaml
    overrides = [f"{k}={v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for k, v in pairs]
    try:
        cfg = config.load(None, overrides)
    except config.ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    _holds_like_its_default(cfg)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(KEYS, VALUES, max_size=4), st.booleans())
def test_fuzz_config_files_give_a_config_or_one_sentence(tmp_path, tree, nest):
    import yaml
    nested = {}
    for key, value in tree.items():                       # dotted keys as nested mappings, or left dotted
        node = nested
        parts = key.split(".") if nest else [key]
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = value
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(nested, allow_unicode=True))
    try:
        cfg = config.load(str(path))
    except config.ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    _holds_like_its_default(cfg)
