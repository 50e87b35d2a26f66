"""Configuration: `config.yaml` is the single source of defaults; the command line overrides it.

    python savpo.py                                  # config.yaml as is
    python savpo.py algo=grpo train.steps=20         # dotted key=value overrides
    python savpo.py --config my.yaml lora.r=16       # another base file

Values are parsed as YAML (`train.lr=1e-5` is a float, `eval.plot=false` a bool). Every key of an
override or a user YAML must already exist in `config.yaml`, and its value must have the same type
(an int is accepted where a float is expected) and, for the keys in `CHOICES`, one of the allowed
values. Anything else stops with one sentence naming the key and what is allowed: no run should
start on a typo. The resolved config is written next to every run (`save`).
"""

import copy
import os
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PATH = os.path.join(HERE, "config.yaml")

# Keys whose value must be one of a fixed set (anything not listed is only type-checked).
CHOICES = {
    "algo": ["savpo", "grpo", "distill", "refine"],
    "model.quantization": ["4bit", "8bit", "none"],
    "model.dtype": ["auto", "float32", "bfloat16", "float16"],
    "model.device": ["auto", "cpu", "cuda"],
    "simulator.appraiser": ["semantic", "lexical", "llm", "generative"],
    "simulator.utterance": ["llm", "template"],
    "aopsd.teacher": ["live", "fixed", "ema"],
    "aopsd.placement": ["system", "turn"],
    "aopsd.vocab": ["full", "topk"],
    "aopsd.divergence": ["forward", "reverse", "jsd"],
    "aopsd.topk_support": ["teacher", "student"],
    "aopsd.turn_weighting": ["uniform", "willingness"],
    "stpr.mode": ["direction", "additive", "outcome"],
    "learn_to_ask.on_bad_line": ["skip", "refuse"],
    "learn_to_ask.extractor": ["labels", "llm"],
    "learn_to_ask.reward": ["default", "sum", "Ra", "Rs"],
    "learn_to_ask.reward_parse": ["published", "strict"],
    "learn_to_ask.grader": ["proxy", "llm"],
    "learn_to_ask.grader_prompt": ["best", "rubric", "rubric+cal", "fewshot", "fewshot+cal", "short", "short+cal"],
}

# Presets applied by `algo` before user overrides (a user override always wins).
PRESETS = {
    "savpo": {},
    "grpo": {"stpr.mode": "outcome", "aopsd.coef": 0.0},
    "distill": {"stpr.coef": 0.0},
    "refine": {"aopsd.coef": 0.0},
}


class ConfigError(ValueError):
    """A user-caused configuration mistake; its message is one sentence naming the key."""


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _check(key, value, default):
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key '{key}' is {value!r}; allowed: {', '.join(map(str, CHOICES[key]))}.")
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if not (isinstance(default, bool) and isinstance(value, bool)):
            raise ConfigError(f"config key '{key}' must be true or false like its default {default!r}, got {value!r}.")
        return value
    if isinstance(default, float) and isinstance(value, (int, str)):
        try:  # YAML 1.1 reads '1e-5' as a string; a number is meant
            return float(value)
        except ValueError:
            pass
    if isinstance(default, list) and isinstance(value, (list, tuple)):
        return list(value)
    if type(value) is not type(default):
        raise ConfigError(f"config key '{key}' must be a {type(default).__name__} like its default "
                          f"{default!r}, got {value!r}.")
    return value


def _set(tree, dotted, value):
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree[p]
    tree[leaf] = value


def parse_override(text):
    """'train.lr=1e-5' -> ('train.lr', 1e-05). Values are YAML scalars or flow lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value (e.g. train.steps=20).")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load(path=None, overrides=()):
    """Defaults from config.yaml, then the user's YAML (if another path), then the preset of the
    resolved `algo`, then `key=value` overrides. Returns a nested dict."""
    with open(DEFAULT_PATH) as f:
        cfg = yaml.safe_load(f)
    flat_defaults = _flatten(cfg)
    updates = {}
    if path and os.path.abspath(path) != DEFAULT_PATH:
        if not os.path.exists(path):
            raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file or omit --config.")
        with open(path) as f:
            user = yaml.safe_load(f) or {}
        if not isinstance(user, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys, like config.yaml.")
        updates.update(_flatten(user))
    for text in overrides:
        key, value = parse_override(text)
        updates[key] = value
    for key in updates:
        if key not in flat_defaults:
            near = [k for k in flat_defaults if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" Did you mean {' or '.join(near)}?" if near else " See config.yaml for the keys."
            raise ConfigError(f"unknown config key '{key}'.{hint}")
    algo = updates.get("algo", cfg["algo"])
    _check("algo", algo, cfg["algo"])
    for key, value in {**PRESETS[algo], **updates}.items():
        _set(cfg, key, _check(key, value, flat_defaults[key]))
    return cfg


def get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def save(cfg, run_dir):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def from_argv(argv=None):
    """Split argv into --config PATH, flags (--name or --name value) and key=value overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path, flags, overrides = None, {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--"):
            name = arg[2:].replace("-", "_")
            if "=" in name:
                name, value = name.split("=", 1)
                flags[name] = value
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and "=" not in argv[i + 1]:
                flags[name] = argv[i + 1]
                i += 1
            else:
                flags[name] = True
        else:
            overrides.append(arg)
        i += 1
    return load(path, overrides), flags


def copy_cfg(cfg):
    return copy.deepcopy(cfg)
