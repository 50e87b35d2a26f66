"""Configuration: `config.yaml` is the single source of defaults; the command line overrides it.

    python savpo.py                                  # config.yaml as is
    python savpo.py algo=grpo train.steps=20         # dotted key=value overrides
    python savpo.py --config my.yaml lora.r=16       # another base file

Values are parsed as YAML (`train.lr=1e-5` is a float, `eval.plot=false` a bool). Every key of an
override or a user YAML must already exist in `config.yaml`, and its value must have the same type
(an int is accepted where a float is expected) and, for the keys in `CHOICES`, one of the allowed
values, and for the keys in `RANGES`, a value in range (plus a few cross-key rules, e.g. a GRPO group
needs two rollouts). Anything else -- and a YAML syntax error, with its line and column -- stops with
one sentence naming the key and what is allowed, before anything is written: no run should start on
a typo. The resolved config is written next to every run (`save`).
"""

import copy
import dataclasses
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
    "aopsd.note": ["concerns", "guide"],
    "rollout.compile": ["auto", "on", "off"],
    "warmstart.views": ["both", "student", "privileged"],
    "aopsd.vocab": ["full", "topk"],
    "aopsd.divergence": ["forward", "reverse", "jsd"],
    "aopsd.topk_support": ["teacher", "student"],
    "aopsd.turn_weighting": ["uniform", "willingness"],
    "stpr.mode": ["direction", "additive", "outcome"],
}

# Allowed ranges, next to CHOICES: every numeric knob a user can set wrong. "> 0" and ">= 1" are
# bounds; "[0, 1]" / "(0, 1]" / "[0, 1)" / "(0, 1)" intervals. Checked after every override.
RANGES = {
    "lora.r": ">= 1", "lora.alpha": "> 0", "lora.dropout": "[0, 1)",
    "personas.eval_n": ">= 1",
    "simulator.max_turns": ">= 1", "simulator.max_new_tokens": ">= 1", "simulator.temperature": ">= 0",
    "simulator.top_p": "(0, 1]", "simulator.generative_max_tokens": ">= 1",
    "simulator.rules.patience": ">= 1", "simulator.rules.reveal_gain": ">= 0", "simulator.rules.resolve_gain": ">= 0",
    "simulator.rules.push_penalty": ">= 0", "simulator.rules.offtopic_penalty": ">= 0",
    "simulator.rules.accept_threshold": "[0, 4]", "simulator.rules.reject_threshold": "[-4, 4]",
    "simulator.rules.max_agent_words": ">= 1", "simulator.rules.max_topics": ">= 1",
    "simulator.rules.false_claim_penalty": ">= 0", "simulator.rules.false_claims_to_reject": ">= 1",
    "simulator.rules.incoherent_penalty": ">= 0", "simulator.rules.ignore_penalty": ">= 0",
    "rollout.max_new_tokens": ">= 1", "rollout.temperature": ">= 0", "rollout.top_p": "(0, 1]",
    "rollout.max_context": ">= 2", "rollout.wave_rows": ">= 0",
    "train.steps": ">= 1", "train.personas_per_step": ">= 1", "train.group_size": ">= 1", "train.epochs": ">= 1",
    "train.micro_batch": ">= 1", "train.lr": "> 0", "train.warmup_steps": ">= 0", "train.weight_decay": ">= 0",
    "personas.curriculum_steps": ">= 0", "warmstart.calls": ">= 1", "warmstart.epochs": ">= 1", "warmstart.lr": "> 0", "warmstart.micro_batch": ">= 1",
    "train.grad_clip": "> 0", "train.eval_every": ">= 0", "train.save_every": ">= 0", "train.samples_every": ">= 0",
    "stpr.coef": ">= 0", "stpr.beta": ">= 0", "stpr.eps_low": "[0, 1)", "stpr.eps_high": ">= 0", "stpr.ref_kl": ">= 0",
    "aopsd.coef": ">= 0", "aopsd.ema_decay": "[0, 1]", "aopsd.alpha": "(0, 1)", "aopsd.topk": ">= 1",
    "aopsd.chunk": ">= 1", "aopsd.clip": ">= 0",
}


def in_range(value, allowed):
    """Is `value` inside `allowed` ('> 0', '>= 1', '[0, 1)', ...)?"""
    if allowed.startswith((">", "<")):
        op, bound = allowed.split()
        bound = float(bound)
        return {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[op]
    lo, hi = (float(x) for x in allowed[1:-1].split(","))
    return (lo <= value if allowed[0] == "[" else lo < value) and (value <= hi if allowed[-1] == "]" else value < hi)


def _check_ranges(cfg, ranges):
    """Every `ranges` key, then the cross-key rules, each refused with one sentence."""
    for key, allowed in ranges.items():
        value = get(cfg, key)
        if not in_range(value, allowed):
            raise ConfigError(f"config key '{key}' is {value!r}; allowed: {allowed}.")
    st, t = cfg["stpr"], cfg["train"]
    if st["coef"] > 0 and st["mode"] in ("direction", "outcome") and t["group_size"] < 2:
        raise ConfigError(f"config key 'train.group_size' is {t['group_size']}; allowed: >= 2 with stpr.mode="
                          f"{st['mode']} (a group of one has no outcome contrast, so every advantage would be 0), "
                          f"or use stpr.mode=additive / algo=distill.")
    if cfg["rollout"]["max_new_tokens"] >= cfg["rollout"]["max_context"]:
        raise ConfigError(f"config key 'rollout.max_new_tokens' is {cfg['rollout']['max_new_tokens']}; allowed: "
                          f"< rollout.max_context ({cfg['rollout']['max_context']}).")


# Presets of `algo`: a preset's keys define the algorithm, so they win over a --config file, and a command-line
# override that contradicts one is refused (`load`).
PRESETS = {
    "savpo": {},
    "grpo": {"stpr.mode": "outcome", "aopsd.coef": 0.0},
    "distill": {"stpr.coef": 0.0},
    "refine": {"aopsd.coef": 0.0},
}


class ConfigError(ValueError):
    """A user-caused configuration mistake; its message is one sentence naming the key."""


@dataclasses.dataclass(frozen=True)
class Section:
    """Another method's keys, kept in its own YAML beside its code (learn_to_ask/config.yaml): `load` adds
    them to the defaults and checks them with their own CHOICES and RANGES."""
    path: str
    choices: dict
    ranges: dict


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _check(key, value, default, choices=CHOICES):
    if key in choices and value not in choices[key]:
        raise ConfigError(f"config key '{key}' is {value!r}; allowed: {', '.join(map(str, choices[key]))}.")
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


def load(path=None, overrides=(), section=None):
    """Defaults from config.yaml (and a `Section`'s YAML), then the user's YAML (if another path), then
    `key=value` overrides, then the preset of the resolved `algo`: a preset's keys define the algorithm
    (grpo *is* outcome advantages without distillation), so they win over the YAML file, and a command-line
    override that contradicts one is an error. Returns a nested dict."""
    with open(DEFAULT_PATH) as f:
        cfg = yaml.safe_load(f)
    choices, ranges = CHOICES, RANGES
    if section is not None:
        with open(section.path) as f:
            cfg.update(yaml.safe_load(f))
        choices, ranges = {**CHOICES, **section.choices}, {**RANGES, **section.ranges}
    flat_defaults = _flatten(cfg)
    updates = {}
    if path and os.path.abspath(path) != DEFAULT_PATH:
        if not os.path.exists(path):
            raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file or omit --config.")
        with open(path) as f:
            try:
                user = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise ConfigError(f"config file '{path}' is not valid YAML{where} "
                                  f"({getattr(e, 'problem', None) or 'syntax error'}); fix the YAML there.") from None
        if not isinstance(user, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys, like config.yaml.")
        updates.update(_flatten(user))
    given = dict(parse_override(text) for text in overrides)
    updates.update(given)
    for key in updates:
        if key not in flat_defaults:
            near = [k for k in flat_defaults if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" Did you mean {' or '.join(near)}?" if near else " See config.yaml for the keys."
            raise ConfigError(f"unknown config key '{key}'.{hint}")
    algo = updates.get("algo", cfg["algo"])
    _check("algo", algo, cfg["algo"])
    for key, value in PRESETS[algo].items():
        if key in given and _check(key, given[key], flat_defaults[key]) != value:
            raise ConfigError(f"algo={algo} is defined by {key}={value}; drop the override {key}={given[key]} "
                              f"(another algorithm is another preset: {', '.join(PRESETS)}).")
    for key, value in {**updates, **PRESETS[algo]}.items():
        _set(cfg, key, _check(key, value, flat_defaults[key], choices))
    _check_ranges(cfg, ranges)
    return cfg


def get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def save(cfg, run_dir):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def command_line(argv, doc):
    """The trainers' command line: (config, flags) from argv, a config error as one sentence, or None after
    printing `doc` for --help / -h."""
    try:
        cfg, flags = from_argv(argv)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    if "help" in flags or "h" in flags:
        print(doc)
        return None
    return cfg, flags


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


def positive_int(text):
    """argparse type for a count flag: an integer >= 1, refused in one sentence naming the value."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def copy_cfg(cfg):
    return copy.deepcopy(cfg)
