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
a typo. The resolved config is written next to every run (`save`, whole, then renamed over the old one).

Two choices where YAML 1.1 surprises: only `true` / `false` are booleans (`rollout.compile=on` is the
text "on", as config.yaml documents it, not True), and a key given twice in one mapping of a file is
refused with its line. A null is refused unless the default is one, a list must hold items of its
default's type (and at least one, where the default has some), a float must be finite, a text key with
a non-empty default must not be empty, and `personas.domains` / `learn_to_ask.domains` must name domain
banks (a name in data/domains/ or a path to a bank YAML), each once.
"""

import copy
import dataclasses
import math
import os
import re
import sys

import yaml

import endpoint
import runfiles

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PATH = os.path.join(HERE, "config.yaml")
DOMAIN_DIR = os.path.join(HERE, "data", "domains")     # personas.DOMAIN_DIR (config does not import personas)
DOMAIN_KEYS = ("personas.domains", "learn_to_ask.domains")
# text keys whose default is not empty but which may be set empty
MAY_BE_EMPTY = {"learn_to_ask.response_prefix", "model.warm_start"}   # "" means none (the base as published)

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
    "personas.eval_n": ">= 1", "personas.eval_samples": ">= 1",
    "simulator.max_turns": ">= 1", "simulator.max_new_tokens": ">= 1", "simulator.temperature": ">= 0",
    "simulator.top_p": "(0, 1]", "simulator.generative_max_tokens": ">= 1", "simulator.endpoint_timeout": "> 0",
    "simulator.rules.patience": ">= 1", "simulator.rules.reveal_gain": ">= 0", "simulator.rules.resolve_gain": ">= 0",
    "simulator.rules.push_penalty": ">= 0", "simulator.rules.offtopic_penalty": ">= 0",
    "simulator.rules.accept_threshold": "[0, 4]", "simulator.rules.reject_threshold": "[-4, 4]",
    "simulator.rules.max_agent_words": ">= 1", "simulator.rules.max_topics": ">= 1",
    "simulator.rules.false_claim_penalty": ">= 0", "simulator.rules.false_claims_to_reject": ">= 1",
    "simulator.rules.incoherent_penalty": ">= 0", "simulator.rules.ignore_penalty": ">= 0",
    "rollout.max_new_tokens": ">= 1", "rollout.temperature": ">= 0", "rollout.top_p": "(0, 1]",
    "rollout.max_context": ">= 2", "rollout.wave_rows": ">= 0",
    "train.steps": ">= 1", "train.personas_per_step": ">= 1", "train.group_size": ">= 1", "train.epochs": ">= 1",
    "train.minibatches": ">= 1", "train.micro_batch": ">= 1", "train.lr": "> 0", "train.warmup_steps": ">= 0", "train.weight_decay": ">= 0",
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


def _check_ranges(cfg, ranges, where=lambda key: ""):
    """Every `ranges` key, then the cross-key rules, each refused with one sentence (`where(key)`: the file
    that set the key, for the message)."""
    for key, allowed in ranges.items():
        value = get(cfg, key)
        if not in_range(value, allowed):
            raise ConfigError(f"config key '{key}'{where(key)} is {value!r}; allowed: {allowed}.")
    st, t = cfg["stpr"], cfg["train"]
    if st["coef"] > 0 and st["mode"] in ("direction", "outcome") and t["group_size"] < 2:
        raise ConfigError(f"config key 'train.group_size' is {t['group_size']}; allowed: >= 2 with stpr.mode="
                          f"{st['mode']} (a group of one has no outcome contrast, so every advantage would be 0), "
                          f"or use stpr.mode=additive / algo=distill.")
    _check_endpoint(cfg["simulator"], where)
    if cfg["rollout"]["max_new_tokens"] >= cfg["rollout"]["max_context"]:
        raise ConfigError(f"config key 'rollout.max_new_tokens' is {cfg['rollout']['max_new_tokens']}; allowed: "
                          f"< rollout.max_context ({cfg['rollout']['max_context']}).")


def _check_endpoint(sim, where):
    """`simulator.model` as a URL (endpoint.py): a well-formed base URL, a model name to ask for, and an
    appraiser that needs no log-probabilities."""
    name = sim["model"]
    if not endpoint.is_url(name):
        if re.match(r"(https?\W|www\.)", name.strip().lower()) or "://" in name:     # a URL, mistyped
            raise ConfigError(f"config key 'simulator.model'{where('simulator.model')} is {name!r}, neither a model nor a "
                              f"URL; give an OpenAI-compatible base URL like http://127.0.0.1:8000/v1.")
        return
    problem = endpoint.url_problem(name)
    if problem:
        raise ConfigError(f"config key 'simulator.model'{where('simulator.model')} is {name!r}, which {problem}; give "
                          f"an OpenAI-compatible base URL like http://127.0.0.1:8000/v1.")
    if not sim["endpoint_model"].strip():
        raise ConfigError(f"config key 'simulator.endpoint_model' is empty, but simulator.model is the endpoint {name!r}; "
                          f"name the model it serves, e.g. simulator.endpoint_model=Qwen/Qwen2.5-7B-Instruct.")
    if sim["appraiser"] == "llm":
        raise ConfigError(f"config key 'simulator.appraiser' is 'llm', which reads next-token log-probabilities that an "
                          f"OpenAI-compatible endpoint does not give reliably (transformers serve refuses them); with "
                          f"simulator.model={name} use simulator.appraiser=generative (or semantic / lexical).")


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


# --------------------------------------------------------------------------- YAML, as a config means it

class YamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):      # libyaml's parser where installed: ~10x faster
    """yaml.SafeLoader with two changes: only true / false are booleans (YAML 1.1 also reads on, off, yes,
    no, y and n as booleans, so `compile: on` became True), and a key given twice in one mapping is an
    error at the second one (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key_node.value}' appears twice in one mapping; keep one",
                        key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))


def yaml_load(stream):
    """Parse YAML text (or a file opened in binary) with `YamlLoader`; raises yaml.YAMLError."""
    return yaml.load(stream, Loader=YamlLoader)


def yaml_problem(error):
    """Where and why a YAML text does not parse, on one line: 'at line 3, column 7 (found ...)'."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or problem is None:        # e.g. a ReaderError: bytes that are not UTF-8
        return f"({' '.join(str(error).split())})"
    return f"at line {mark.line + 1}, column {mark.column + 1} ({' '.join(str(problem).split())})"


def read_yaml(path, what="config file"):
    """The YAML file `path`, parsed with `YamlLoader`; a missing, unreadable or malformed file is a
    ConfigError naming it (and the line and column)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} '{path}' does not exist; pass an existing YAML file.")
    try:
        with open(path, "rb") as f:
            return yaml_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} '{path}' is not valid YAML {yaml_problem(e)}; fix the YAML there.") from None
    except OSError as e:
        raise ConfigError(f"{what} '{path}' cannot be read ({e.strerror or type(e).__name__}).") from None


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


def _kind(default):
    """'an int', 'a number', 'a text', 'a list': what a value like `default` is, for a message."""
    return {bool: "true or false", int: "an int", float: "a number", str: "a text", list: "a list",
            dict: "a mapping"}.get(type(default), f"a {type(default).__name__}")


def _check(key, value, default, choices=CHOICES, where=""):
    """`value` for `key` as the config holds it (an int where a float is meant becomes a float), or a
    ConfigError naming the key (and, by `where`, the file that set it)."""
    name = f"config key '{key}'{where}"
    if key in choices:
        if not any(value == c and type(value) is type(c) for c in choices[key]):
            raise ConfigError(f"{name} is {value!r}; allowed: {', '.join(map(str, choices[key]))}.")
        return value
    if default is None:
        return value
    if value is None:
        raise ConfigError(f"{name} is empty (null); give {_kind(default)} like its default {default!r}.")
    if isinstance(default, bool) or isinstance(value, bool):
        if not (isinstance(default, bool) and isinstance(value, bool)):
            raise ConfigError(f"{name} must be {_kind(default)} like its default {default!r}, got {value!r}.")
        return value
    if isinstance(default, float) and isinstance(value, (int, str)):
        try:  # YAML 1.1 reads '1e-5' as a string; a number is meant
            value = float(value)
        except (ValueError, OverflowError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} is {value!r}; allowed: a finite number.")
    if isinstance(default, list) and isinstance(value, (list, tuple)):
        value = list(value)
        if default and not value:
            raise ConfigError(f"{name} is an empty list; give at least one item, like its default {default!r}.")
        kinds = {type(x) for x in default}
        if len(kinds) == 1 and not all(type(x) in kinds for x in value):
            items = {str: "texts", int: "ints", float: "numbers"}.get(type(default[0]), "items like its default's")
            raise ConfigError(f"{name} must be a list of {items} like its default {default!r}, got {value!r}.")
        if all(isinstance(x, str) for x in value) and len(set(value)) < len(value):
            twice = next(x for i, x in enumerate(value) if x in value[:i])
            raise ConfigError(f"{name} lists {twice!r} twice; give each item once.")
        return value
    if type(value) is not type(default):
        raise ConfigError(f"{name} must be {_kind(default)} like its default {default!r}, got {value!r}.")
    if isinstance(value, str):
        if default and not value.strip() and key not in MAY_BE_EMPTY:
            raise ConfigError(f"{name} is empty; give a value like its default {default!r}.")
        if any(ord(ch) < 32 and ch != "\t" for ch in value):
            raise ConfigError(f"{name} is {value!r}, which holds a control character; give plain text.")
    return value


def _check_domains(cfg, where):
    """Each entry of the DOMAIN_KEYS lists names a bank: data/domains/NAME.yaml or a path to a YAML file."""
    shipped = sorted(f[:-5] for f in os.listdir(DOMAIN_DIR) if f.endswith(".yaml"))
    for key in DOMAIN_KEYS:
        try:
            domains = get(cfg, key)
        except KeyError:
            continue
        for d in domains:
            if d not in shipped and not os.path.isfile(d):
                raise ConfigError(f"config key '{key}'{where(key)} names {d!r}, which is no domain bank; allowed: "
                                  f"{', '.join(shipped)}, or the path of a bank YAML file.")


def _set(tree, dotted, value):
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree[p]
    tree[leaf] = value


def parse_override(text):
    """'train.lr=1e-5' -> ('train.lr', 1e-05). Values are YAML scalars or flow lists (`YamlLoader`: 'on'
    stays the text 'on'); a value YAML cannot parse is kept as the text given."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value (e.g. train.steps=20).")
    key, raw = text.split("=", 1)
    try:
        value = yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load(path=None, overrides=(), section=None):
    """Defaults from config.yaml (and a `Section`'s YAML), then the user's YAML (if another path), then
    `key=value` overrides, then the preset of the resolved `algo`: a preset's keys define the algorithm
    (grpo *is* outcome advantages without distillation), so they win over the YAML file, and a command-line
    override that contradicts one is an error. Returns a nested dict."""
    cfg = read_yaml(DEFAULT_PATH)
    choices, ranges = CHOICES, RANGES
    if section is not None:
        cfg.update(read_yaml(section.path))
        choices, ranges = {**CHOICES, **section.choices}, {**RANGES, **section.ranges}
    flat_defaults = _flatten(cfg)
    updates = {}
    from_file = set()
    if path and os.path.abspath(path) != DEFAULT_PATH:
        user = read_yaml(path)
        if user is None:
            user = {}
        if not isinstance(user, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys, like config.yaml.")
        updates.update(_flatten(user))
        from_file = set(updates)
    given = dict(parse_override(text) for text in overrides)
    updates.update(given)
    where = lambda key: f" (set in {path})" if key in from_file and key not in given else ""
    sections = {k.rsplit(".", i)[0] for k in flat_defaults for i in range(1, k.count(".") + 1)}
    for key in updates:
        if key not in flat_defaults:
            if key in sections:
                example = next(k for k in flat_defaults if k.startswith(key + "."))
                raise ConfigError(f"config key {key!r}{where(key)} is a section; set its keys one by one, "
                                  f"e.g. {example}={flat_defaults[example]!r}.")
            near = [k for k in flat_defaults if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" Did you mean {' or '.join(near)}?" if near else " See config.yaml for the keys."
            raise ConfigError(f"unknown config key {key!r}{where(key)}.{hint}")
    algo = updates.get("algo", cfg["algo"])
    _check("algo", algo, cfg["algo"], where=where("algo"))
    for key, value in PRESETS[algo].items():
        if key in given and _check(key, given[key], flat_defaults[key]) != value:
            raise ConfigError(f"algo={algo} is defined by {key}={value}; drop the override {key}={given[key]} "
                              f"(another algorithm is another preset: {', '.join(PRESETS)}).")
    for key, value in {**updates, **PRESETS[algo]}.items():
        _set(cfg, key, _check(key, value, flat_defaults[key], choices, where(key)))
    _check_ranges(cfg, ranges, where)
    _check_domains(cfg, where)
    return cfg


# what a warm start (warmstart.py) depends on: a run with other values needs its own
WARM_START_MUST_MATCH = ("model.name_or_path", "aopsd.note", "aopsd.placement", "warmstart.views", "warmstart.calls",
                         "warmstart.seed", "warmstart.epochs", "lora.r", "lora.target_modules")


def check_warm_start(cfg):
    """cfg with model.warm_start found and checked: a folder as given, or inside the project (the shipped
    data/warmstart/adapter works from any directory); an adapter with the config it was made with beside it
    (FOLDER/../config.yaml) must have been made for this run's WARM_START_MUST_MATCH keys, else one sentence."""
    path = cfg["model"]["warm_start"]
    if not path or path == "auto":
        return cfg
    if not os.path.exists(path) and os.path.exists(os.path.join(HERE, path)):
        path = os.path.join(HERE, path)
    made_with = os.path.join(os.path.dirname(os.path.normpath(path)), "config.yaml")
    if os.path.exists(made_with):   # one made for another model or note would start this run from the wrong place
        made = load(made_with)
        for key in WARM_START_MUST_MATCH:
            if get(made, key) != get(cfg, key):
                raise ConfigError(f"model.warm_start={cfg['model']['warm_start']}: the adapter in {path} was made with "
                                  f"{key}={get(made, key)}, this run has {get(cfg, key)}; start without it "
                                  f"(model.warm_start=), or build one for this run: model.warm_start=auto with a "
                                  f"warmstart.out_dir of its own.")
    return {**cfg, "model": {**cfg["model"], "warm_start": path}}


def get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def save(cfg, run_dir):
    """RUN/config.yaml, written whole then renamed: a kill never leaves a half config that a resume would
    fill in with defaults."""
    os.makedirs(run_dir, exist_ok=True)
    runfiles.write_text(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(cfg, sort_keys=False))


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
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError("--config needs the path of a YAML file, e.g. --config presets/cpu_long.yaml.")
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
