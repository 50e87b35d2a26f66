"""Domain banks, stratified persona sampling, and the three views of a persona.

    python personas.py --domain merchant_recruitment --n 6 --seed 0      # personas as JSON lines

A *domain bank* (`data/domains/NAME.yaml`) describes one kind of outbound call: the agent's role,
goal and the facts it may use; the observable trait vocabulary of the callee; a library of hidden
*concerns* (what the user would say, the cues that probe it, the cues that resolve it, a severity
range and a disclosure rule); fallback lines; and the *strata*.

A *persona* is one simulated callee: observable traits, a communication style, an initial
willingness (0-4) and 1-3 hidden concerns. Sampling is *stratified*: the cells
(number of concerns) x (initial willingness band) x (style) are visited in a seeded random order,
round after round, so every cell holds the same number of personas (+-1) and the same seed gives
the same personas. `persona_id` is a hash of the persona's content, so it is stable across runs and
two sets are disjoint exactly when their ids are (`check_disjoint`).

Each persona renders three views:
- public    -- the CRM card the deployed agent sees (name and external traits, nothing hidden);
- private   -- the hidden concerns, shown only to the privileged teacher (AOPSD);
- simulator -- everything, for the Cognitive User Simulator.
"""

import argparse
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import random
import re

import yaml

import config
import facts
import runfiles

DOMAIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "domains")
DISCLOSURE_RULES = ("probe", "push", "guarded")
STYLES = ("terse", "chatty", "skeptical")


class DomainError(ValueError):
    """A malformed domain bank; the message names the file and the field."""


@dataclasses.dataclass
class Concern:
    id: str
    category: str
    statement: str          # how the user voices it once revealed
    probe_cues: list        # lowercase phrases an agent asking about it would use
    resolve_cues: list      # lowercase phrases an agent credibly answering it would use
    resolution: str         # the fact that resolves it
    severity: int           # 1..3, sampled from the bank's range; scales the willingness gain
    disclosure: str         # probe | push | guarded (see simulator.py)


@dataclasses.dataclass
class Persona:
    persona_id: str
    domain: str
    name: str
    traits: dict
    style: str
    willingness: float      # initial willingness on the 0-4 scale
    concerns: list          # [Concern]
    stratum: str            # e.g. "c2-low-skeptical"

    def to_dict(self):
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d):
        return Persona(**{**d, "concerns": [Concern(**c) for c in d["concerns"]]})


# --------------------------------------------------------------------------- domain banks

_BANK_FIELDS = {"name": str, "title": str, "agent": dict, "user_role": str, "openings": list,
                "names": list, "traits": dict, "styles": dict, "concerns": list, "push_cues": list,
                "topic_cues": list, "templates": dict, "strata": dict}
_CONCERN_FIELDS = {"id": str, "category": str, "statement": str, "probe_cues": list,
                   "resolve_cues": list, "resolution": str, "severity": list, "disclosure": str}
_TEMPLATE_KINDS = ("neutral", "probe_no_concern", "resolved", "accept", "reject", "hangup", "false_claim", "incoherent",
                   "ignored")
_BANK_CACHE = {}        # name and absolute path -> bank
_BANK_PATHS = {}        # name -> the absolute path it was read from


def _need(cond, path, field, what):
    if not cond:
        raise DomainError(f"{path}: field '{field}' {what}.")


def _is_text(x):
    return isinstance(x, str) and bool(x.strip())


def _texts(x, nonempty=True):
    """Is `x` a list of non-empty texts (holding at least one, if `nonempty`)?"""
    return isinstance(x, list) and all(map(_is_text, x)) and (bool(x) or not nonempty)


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_bank(bank, path):
    """The bank, if every field a reader uses is there with the type it needs (the texts non-empty, the
    lists a persona draws from non-empty); else a DomainError naming the file and the field."""
    _need(isinstance(bank, dict), path, "<top>", "must be a mapping (see data/domains/merchant_recruitment.yaml)")
    for field, typ in _BANK_FIELDS.items():
        _need(field in bank, path, field, "is missing")
        _need(isinstance(bank[field], typ), path, field, f"must be a {typ.__name__}")
    _need(re.fullmatch(r"[A-Za-z0-9_-]+", bank["name"]) is not None, path, "name",
          "must be a simple name (letters, digits, _ and -): personas find their bank by it")
    for field in ("title", "user_role"):
        _need(_is_text(bank[field]), path, field, "must be a non-empty text")
    for field in ("role", "goal", "company"):
        _need(field in bank["agent"], path, f"agent.{field}", "is missing")
        _need(_is_text(bank["agent"][field]), path, f"agent.{field}", "must be a non-empty text")
    _need("facts" in bank["agent"], path, "agent.facts", "is missing")
    _need(_texts(bank["agent"]["facts"]), path, "agent.facts", "must be a non-empty list of texts, one fact each")
    for field in ("openings", "names"):
        _need(_texts(bank[field]), path, field, "must be a non-empty list of texts")
    for field in ("push_cues", "topic_cues"):
        _need(_texts(bank[field], nonempty=False), path, field, "must be a list of texts")
    for field in ("open_probe_examples", "push_examples", "vague_examples"):      # the semantic appraiser's
        _need(_texts(bank.get(field, []), nonempty=False), path, field, "must be a list of texts")
    for trait, values in bank["traits"].items():
        _need(_is_text(trait), path, f"traits.{trait}", "must be named by a text")
        _need(_texts(values), path, f"traits.{trait}", "must be a non-empty list of texts (the values to draw from)")
    for style in STYLES:
        _need(style in bank["styles"], path, f"styles.{style}", "is missing")
        _need(_is_text(bank["styles"][style]), path, f"styles.{style}", "must be a non-empty text")
    for kind in _TEMPLATE_KINDS:
        _need(_texts(bank["templates"].get(kind)), path, f"templates.{kind}", "must be a non-empty list of texts")
    _need(bool(bank["concerns"]), path, "concerns", "must hold at least one concern")
    ids = set()
    for i, c in enumerate(bank["concerns"]):
        _need(isinstance(c, dict), path, f"concerns[{i}]", "must be a mapping of the concern's fields")
        for field, typ in _CONCERN_FIELDS.items():
            _need(field in c, path, f"concerns[{i}].{field}", "is missing")
            _need(isinstance(c[field], typ), path, f"concerns[{i}].{field}", f"must be a {typ.__name__}")
            if typ is str:
                _need(_is_text(c[field]), path, f"concerns[{i}].{field}", "must be a non-empty text")
        _need(c["disclosure"] in DISCLOSURE_RULES, path, f"concerns[{i}].disclosure",
              f"must be one of {', '.join(DISCLOSURE_RULES)}")
        lo_hi = c["severity"]
        _need(len(lo_hi) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in lo_hi)
              and 1 <= lo_hi[0] <= lo_hi[1] <= 3, path, f"concerns[{i}].severity", "must be [min, max] within 1..3")
        for field in ("probe_cues", "resolve_cues"):
            _need(_texts(c[field]), path, f"concerns[{i}].{field}", "must be a non-empty list of texts")
        for field in ("probe_examples", "answer_examples"):
            _need(_texts(c.get(field, []), nonempty=False), path, f"concerns[{i}].{field}", "must be a list of texts")
        _need(c["id"] not in ids, path, f"concerns[{i}].id", f"'{c['id']}' is a duplicate")
        truth = c.get("truth", {})
        _need(isinstance(truth, dict) and set(truth) <= {"denies", "asserts"} and all(
            isinstance(v, list) and all(isinstance(x, str) and x.strip() for x in v) for v in truth.values()),
            path, f"concerns[{i}].truth", "must be a mapping with optional 'denies' and 'asserts' lists of phrases")
        ids.add(c["id"])
    strata = bank["strata"]
    for field, typ in (("n_concerns", list), ("willingness", dict), ("style", list)):
        _need(field in strata, path, f"strata.{field}", "is missing")
        _need(isinstance(strata[field], typ) and strata[field], path, f"strata.{field}",
              f"must be a non-empty {typ.__name__}")
    _need(all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n for n in strata["n_concerns"]), path,
          "strata.n_concerns", "must list numbers of concerns (1, 2, ...)")
    _need(max(strata["n_concerns"]) <= len(bank["concerns"]), path, "strata.n_concerns",
          "asks for more concerns than the library holds")
    # answering a worry means stating its fact (facts.py), so every fact needs something to check
    for cid in facts.uncheckable(bank):
        _need(False, path, f"concerns.{cid}", "has nothing checkable: give its resolution a figure or list what it "
                                              "rules out / says exists under `truth` (denies, asserts)")
    for band, rng in strata["willingness"].items():
        _need(_is_text(band), path, f"strata.willingness.{band}", "must be named by a text (low, mid, ...)")
        _need(isinstance(rng, list) and len(rng) == 2 and all(map(_number, rng)) and 0 <= rng[0] <= rng[1] <= 4, path,
              f"strata.willingness.{band}", "must be [low, high] within 0..4")
    _need(all(style in STYLES for style in strata["style"]), path, "strata.style",
          f"must list styles of {', '.join(STYLES)}")
    questions = bank.get("expert_questions", {})
    _need(isinstance(questions, dict) and all(_texts(q) and len(q) == 2 for q in questions.values()), path,
          "expert_questions", "must map concern ids to two questions each")
    # one fact, one concern: the simulator counts the concerns a turn answers (a recital of facts
    # resolves nothing), so a concern's resolution must not hold another concern's resolve cue
    for i, c in enumerate(bank["concerns"]):
        for other in bank["concerns"]:
            shared = [cue for cue in other["resolve_cues"] if other is not c and
                      re.search(r"(?<![a-z0-9])" + re.escape(cue.lower()) + r"(?![a-z0-9])", c["resolution"].lower())]
            _need(not shared, path, f"concerns[{i}].resolution",
                  f"holds {shared[0]!r}, a resolve cue of '{other['id']}' (each fact must answer one concern)" if shared else "")
    return bank


def list_domains():
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(DOMAIN_DIR, "*.yaml")))


def is_bank_path(domain):
    """Does `domain` name a bank by its file (a path) rather than by its name?"""
    return os.sep in domain or "/" in domain or domain.endswith((".yaml", ".yml"))


def load_bank(domain):
    """Load and validate a domain bank by name (data/domains/NAME.yaml) or by the path of a YAML file.
    A bank read from a path is known by its `name` from then on (personas find their bank by
    `Persona.domain`); that name must not be a shipped bank's or another loaded bank's."""
    if domain in _BANK_CACHE:
        return _BANK_CACHE[domain]
    path = domain if is_bank_path(domain) else os.path.join(DOMAIN_DIR, f"{domain}.yaml")
    key = os.path.abspath(path)
    if key in _BANK_CACHE:
        return _BANK_CACHE[key]
    if not os.path.isfile(path):
        raise DomainError(f"{path}: no such domain bank; available: {', '.join(list_domains())}, or the path "
                          f"of a bank YAML file.")
    try:
        with open(path, "rb") as f:
            bank = config.yaml_load(f)
    except yaml.YAMLError as e:
        raise DomainError(f"{path}: not valid YAML {config.yaml_problem(e)}; fix the YAML there.") from None
    except OSError as e:
        raise DomainError(f"{path}: cannot be read ({e.strerror or type(e).__name__}).") from None
    validate_bank(bank, path)
    name = bank["name"]
    shipped = os.path.abspath(os.path.join(DOMAIN_DIR, f"{name}.yaml"))
    if not is_bank_path(domain) and name != domain:
        raise DomainError(f"{path}: field 'name' is {name!r}; name it {domain!r}, like its file (personas find "
                          f"their bank by name).")
    other = _BANK_PATHS.get(name, shipped if os.path.isfile(shipped) else key)
    if other != key:
        raise DomainError(f"{path}: field 'name' is {name!r}, the name of another bank ({other}); give this bank "
                          f"its own name.")
    _BANK_PATHS[name] = key
    _BANK_CACHE[key] = _BANK_CACHE[name] = bank
    return bank


def check_domains(domains, note=None):
    """Load every bank of `domains` (names or paths) now, so that a bad one stops a command before any
    work; with note='guide', also check that every concern has its expert questions. Returns the banks'
    names."""
    names = [load_bank(d)["name"] for d in domains]
    if note == "guide":
        for name in names:
            expert_questions(name)
    return names


# --------------------------------------------------------------------------- sampling

def strata_cells(bank):
    s = bank["strata"]
    return list(itertools.product(s["n_concerns"], sorted(s["willingness"]), s["style"]))


def _persona_id(domain, content):
    digest = hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]
    return f"{domain[:3]}-{digest}"


def sample(domain, n, seed, exclude_ids=(), n_concerns=None):
    """n personas of one domain, stratified and deterministic in `seed`. Personas whose id is in
    `exclude_ids` (e.g. the training set) are skipped and redrawn. `n_concerns` (e.g. (1,)) keeps only
    the cells with that many concerns (a curriculum's easy personas: another stream, seeded apart)."""
    bank = load_bank(domain)
    rng = random.Random(f"{bank['name']}:{seed}" + (f":c{','.join(map(str, n_concerns))}" if n_concerns else ""))
    cells = [c for c in strata_cells(bank) if not n_concerns or c[0] in n_concerns]
    order, personas, exclude = [], [], set(exclude_ids)
    while len(personas) < n:
        if not order:
            order = cells[:]
            rng.shuffle(order)
        n_concerns, band, style = order.pop()
        lo, hi = bank["strata"]["willingness"][band]
        chosen = rng.sample(bank["concerns"], n_concerns)
        content = {
            "name": rng.choice(bank["names"]),
            "traits": {key: rng.choice(values) for key, values in sorted(bank["traits"].items())},
            "style": style,
            "willingness": round(rng.uniform(lo, hi), 1),
            "concerns": [{**{k: c[k] for k in _CONCERN_FIELDS if k != "severity"},
                          "severity": rng.randint(*c["severity"])} for c in chosen],
        }
        pid = _persona_id(bank["name"], content)
        if pid in exclude or any(p.persona_id == pid for p in personas):
            order.append((n_concerns, band, style))  # redraw the same cell so strata stay even
            continue
        personas.append(Persona(persona_id=pid, domain=bank["name"], stratum=f"c{n_concerns}-{band}-{style}",
                                **{**content, "concerns": [Concern(**c) for c in content["concerns"]]}))
    return personas


def sample_many(domains, n, seed, exclude_ids=()):
    """n personas spread evenly over several domains."""
    if not domains:
        raise DomainError("no domain bank given; name at least one (personas.domains).")
    per = [n // len(domains) + (i < n % len(domains)) for i in range(len(domains))]
    return [p for d, k in zip(domains, per) for p in sample(d, k, seed, exclude_ids)]


def schedule(domains, per_step, seed, step, curriculum_steps=0):
    """The training personas of optimisation step `step` (0-based). The global slots
    step * per_step ... (step + 1) * per_step - 1 are dealt round-robin over the domains, and slot j
    takes persona j // len(domains) of its domain's stratified stream `sample(domain, ., seed)`,
    whose prefixes are stable. So a step mixes domains (and, within a domain, consecutive personas
    come from different strata cells), and step k's personas depend only on the seed and k -- not
    on how many steps the run has, so a resumed or longer run sees the same personas at each step.

    Example, domains [A, B, C], per_step 2: step 0 -> A#0, B#0; step 1 -> C#0, A#1; step 2 -> B#1, C#1.

    A curriculum (`curriculum_steps` > 0): the first steps draw from one-concern personas only (their own
    stream), and step `curriculum_steps` + k then has the personas step k has without one."""
    if not domains:
        raise DomainError("no domain bank given; name at least one (personas.domains).")
    easy = step < curriculum_steps
    step = step if easy else step - curriculum_steps
    slots = range(step * per_step, (step + 1) * per_step)
    n = len(domains)
    need = {d: (max((j for j in slots if j % n == k), default=-1) // n) + 1 for k, d in enumerate(domains)}
    streams = {d: sample(d, need[d], seed, n_concerns=(1,) if easy else None) if need[d] else [] for d in domains}
    return [streams[domains[j % n]][j // n] for j in slots]


def check_disjoint(train, evaluation):
    """Refuse evaluation personas that also appear in training."""
    overlap = {p.persona_id for p in train} & {p.persona_id for p in evaluation}
    if overlap:
        raise ValueError(f"{len(overlap)} evaluation personas also appear in training "
                         f"(e.g. {sorted(overlap)[0]}); use a different eval seed or pass exclude_ids.")


def save_jsonl(personas, path):
    runfiles.write_jsonl(path, (p.to_dict() for p in personas))


def load_jsonl(path):
    """Personas from a JSONL file `save_jsonl` wrote; a line that is not a persona record is a ValueError
    naming FILE:LINE."""
    personas = []
    for line in runfiles.jsonl_lines(path):
        try:
            if line.problem:
                raise ValueError(line.problem)
            personas.append(Persona.from_dict(line.record))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{path}:{line.number}: not a persona record ({e}); "
                             f"write persona files with personas.save_jsonl.") from None
    return personas


# --------------------------------------------------------------------------- views

def public_view(persona):
    """The CRM card: who is being called and what is observable. Never a hidden concern."""
    bank = load_bank(persona.domain)
    traits = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in persona.traits.items())
    return f"Callee: {persona.name}, {bank['user_role']}. {traits}."


NOTE_STYLES = ("concerns", "guide")
EXPERT_QUESTIONS = os.path.join(DOMAIN_DIR, "..", "logs", "expert_questions.yaml")
_QUESTIONS = {}


def expert_questions(domain):
    """{concern id: [a first question, a second one]} that would draw each concern out: the bank's own
    `expert_questions` if it has them, else the scripted expert's, data/logs/expert_questions.yaml. A
    concern without them is a DomainError saying where to add them."""
    bank = load_bank(domain)
    questions = bank.get("expert_questions")
    if questions is None:
        if not _QUESTIONS:
            _QUESTIONS.update(config.read_yaml(EXPERT_QUESTIONS, "expert question file") or {})
        questions = _QUESTIONS.get(bank["name"])
        questions = questions if isinstance(questions, dict) else {}
    missing = [c["id"] for c in bank["concerns"]
               if not (_texts(questions.get(c["id"])) and len(questions[c["id"]]) == 2)]
    if missing:
        raise DomainError(f"domain bank {bank['name']}: concern '{missing[0]}' has no two expert questions (the guide "
                          f"note and the warm start ask them); add `expert_questions: {{{missing[0]}: [a question, "
                          f"another]}}` to the bank, or set aopsd.note=concerns.")
    return questions


def private_view(persona, style="concerns"):
    """The hidden concerns, for the privileged teacher only, and nothing else: no other concern of the
    bank, no fact that does not answer one of them.
      concerns -- each as a topic and in the callee's words;
      guide    -- per concern: the topic, how the callee would put it, a question that would draw it out
                  and the fact that answers it (the bank's resolution): what to ask, what to say.
    'guide' for a callee worried about the commission:
      Private note (the callee has not said this yet). Their worries:
      1. commission fees: they would say "Honestly, your commission would eat ...". Ask: "Can I ask, is the
      commission on each order something that worries you?" When they say it, answer: "Commission is 15% ..."."""
    if style == "concerns":
        worries = " ".join(f"{c.id.replace('_', ' ')}: \"{c.statement}\"" for c in persona.concerns)
        return f"Private note (the callee has not said this yet): they are worried about {worries}"
    questions = expert_questions(persona.domain)
    lines = [f"{k}. {c.id.replace('_', ' ')}: they would say \"{c.statement}\" Ask: \"{questions[c.id][0]}\" "
             f"When they say it, answer: \"{c.resolution}\"" for k, c in enumerate(persona.concerns, 1)]
    return "Private note (the callee has not said this yet). Their worries:\n" + "\n".join(lines)


CALLEE_LABELS = (r"customer|callee|client|user|owner|rider|merchant|restaurant|caller|prospect|homeowner|household|"
                 r"them|him|her|me")


def callee_label(persona):
    """A pattern for a line that starts speaking as the callee: 'Customer:', 'Maria:', 'Maria Rossi:' at
    the start of the text, a line or a sentence (the agent writing the callee's part)."""
    names = "|".join(re.escape(n) for n in (persona.name, persona.name.split()[0]))
    return re.compile(rf"(^|\n|[.!?:]\s+|\s)({CALLEE_LABELS}|{names})\s*:", re.I)


def simulator_view(persona):
    """Everything about the persona, for the user simulator."""
    return persona.to_dict()


def agent_system_prompt(persona):
    """The deployed agent's system block: who it calls (the public view), the facts it may use, how a
    good call goes, and a one-line example opening. A 135M model follows an explicit recipe and an
    example far better than a goal alone (measured: questions in 56% of first turns vs 34%)."""
    bank = load_bank(persona.domain)
    agent = bank["agent"]
    facts = "\n".join(f"- {f}" for f in agent["facts"])
    return (f"You are Sam from {agent['company']}, on a phone call. {public_view(persona)} Your goal: {agent['goal']}.\n"
            f"Facts you can use:\n{facts}\n"
            f"How to talk: first ask what worries them. When they tell you a worry, answer it with the matching "
            f"fact. When every worry is answered, ask them to sign up. Say one or two short sentences.\n"
            f"Example:\nCustomer: Hello?\nSam: Hi, this is Sam from {agent['company']}. Is anything about this "
            f"worrying you?")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Sample stratified personas and print them as JSON lines.")
    parser.add_argument("--domain", default="merchant_recruitment",
                        help=f"a bank's name ({', '.join(list_domains())}) or the path of a bank YAML file")
    parser.add_argument("--n", type=config.positive_int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--view", default="full", choices=["full", "public", "private"])
    args = parser.parse_args(argv)
    try:
        people = sample(args.domain, args.n, args.seed)
        texts = {p.persona_id: public_view(p) if args.view == "public" else private_view(p) for p in people}
    except (DomainError, config.ConfigError) as e:
        raise SystemExit(str(e))
    for p in people:
        if args.view == "full":
            print(json.dumps(p.to_dict()))
        else:
            print(json.dumps({"persona_id": p.persona_id, args.view: texts[p.persona_id]}))


if __name__ == "__main__":
    main()
