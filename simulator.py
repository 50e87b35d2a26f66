"""Cognitive User Simulator (CUS): a simulated callee with hidden concerns and an explicit state.

    python simulator.py --domain courier_recruitment --seed 0     # one dialogue, state after each turn

Every dialogue has a `UserState`: each concern's status (hidden -> revealed -> resolved),
willingness on a 0-4 scale, remaining patience, and the decision (continue / accept / reject /
hangup / timeout). Each agent turn is first *appraised* -- which concerns it probed, which it
addressed, whether it pushed for a decision, whether it was off-topic or over-long -- and the
state is updated by the transition rule below. Only then is the user's line generated, by the
simulator model, from the persona and the *new* state, so words and state never disagree.

Transition rule (`transition`; every number is a `simulator.rules.*` config key):
  1. Probing a hidden concern counts a probe. It is revealed at the first probe if its disclosure
     rule is `probe` or `push`, at the second if `guarded`. A `push` concern is also revealed,
     blurted out as an objection, when the agent pushes for a decision. Each reveal: +reveal_gain.
  2. Addressing a revealed concern (this turn's reveals included) resolves it:
     +resolve_gain x severity (severity 1-3).
  3. Pushing for a decision while any concern is unresolved: -push_penalty.
  4. An off-topic turn (no domain word, no probe, no answer, no push): -offtopic_penalty.
  5. Willingness is clipped to [0, 4]. Patience drops by 1 on a turn that neither revealed nor
     resolved anything, and by 1 more on an over-long turn (> max_agent_words).
  6. Decision: `accept` iff the agent pushed, every concern is resolved and willingness >=
     accept_threshold; else `reject` if willingness <= reject_threshold; else `hangup` if
     patience <= 0; else `timeout` once max_turns agent turns are spent; else `continue`.
  Accept is the only success.

Appraisers (`simulator.appraiser`):
  lexical    -- cue matching against the domain bank: deterministic and instant (tests, CPU runs);
  llm        -- yes/no questions to the simulator model, decided by the log-odds of "Yes" vs "No"
                minus the same log-odds on a content-free message (contextual calibration), so a
                small model's bias towards one answer cancels out; no free text is parsed;
  generative -- the simulator model writes the appraisal in tags, parsed strictly; a parse failure
                falls back to `lexical` and is counted (`stats["parse_failures"]`).

User lines (`simulator.utterance`): `llm` generates them with the simulator model (the same base
with the LoRA adapter disabled, sharing no cache with the policy), guided by an instruction derived
from the new state; an empty line, a line that speaks as the agent (role inversion, including
echoing five or more of the agent's words in a row) or one that
contradicts the state (e.g. a reveal that names nothing of the concern) is replaced by a line built
from the bank, and counted. `template` builds every line from the bank (fast, deterministic).
"""

import argparse
import copy
import dataclasses
import random
import re

import torch

import lm
import personas as P
import rollout
from rollout import KVBatch

STATUS = ("hidden", "revealed", "resolved")
MOODS = ("cold and annoyed", "hesitant", "neutral", "warm", "keen")
ROLE_INVERSION = re.compile(
    r"^\s*(agent|salesperson|assistant|representative|caller|sales rep)\s*:|"
    r"\b(i'?m|i am) calling (from|on behalf)|\bsign you up\b|\bhow (can|may) i (help|assist) you\b|"
    r"\bwould you like to (sign|join|register)|\bthank you for (your call|calling)", re.I)


@dataclasses.dataclass
class UserState:
    concern_status: dict            # concern id -> hidden | revealed | resolved
    probes: dict                    # concern id -> times probed
    willingness: float              # 0..4
    patience: int
    decision: str = "continue"      # continue | accept | reject | hangup | timeout
    turn: int = 0                   # agent turns so far
    delta_willingness: float = 0.0  # change caused by the latest agent turn (STPR's direction)
    events: dict = dataclasses.field(default_factory=dict)  # the latest appraisal + what changed

    def to_dict(self):
        return dataclasses.asdict(self)


def initial_state(persona, rules):
    ids = [c.id for c in persona.concerns]
    return UserState(concern_status={i: "hidden" for i in ids}, probes={i: 0 for i in ids},
                     willingness=persona.willingness, patience=rules["patience"])


# --------------------------------------------------------------------------- transition rule

def transition(state, persona, appraisal, rules, max_turns):
    """The documented rule (module docstring). Pure: returns a new state. `appraisal` is
    {"probed": set of concern ids, "addressed": set, "push": bool, "off_topic": bool,
     "too_long": bool, "probed_other": bool}."""
    s = copy.deepcopy(state)
    s.turn += 1
    w0 = s.willingness
    revealed, resolved = [], []
    for c in persona.concerns:
        if s.concern_status[c.id] != "hidden":
            continue
        if c.id in appraisal["probed"]:
            s.probes[c.id] += 1
        needed = 2 if c.disclosure == "guarded" else 1
        if s.probes[c.id] >= needed or (c.disclosure == "push" and appraisal["push"]):
            s.concern_status[c.id] = "revealed"
            s.willingness += rules["reveal_gain"]
            revealed.append(c.id)
    for c in persona.concerns:
        if s.concern_status[c.id] == "revealed" and c.id in appraisal["addressed"]:
            s.concern_status[c.id] = "resolved"
            s.willingness += rules["resolve_gain"] * c.severity
            resolved.append(c.id)
    all_resolved = all(v == "resolved" for v in s.concern_status.values())
    if appraisal["push"] and not all_resolved:
        s.willingness -= rules["push_penalty"]
    if appraisal["off_topic"]:
        s.willingness -= rules["offtopic_penalty"]
    s.willingness = round(min(4.0, max(0.0, s.willingness)), 4)
    s.patience -= (0 if revealed or resolved else 1) + (1 if appraisal["too_long"] else 0)
    if appraisal["push"] and all_resolved and s.willingness >= rules["accept_threshold"]:
        s.decision = "accept"
    elif s.willingness <= rules["reject_threshold"]:
        s.decision = "reject"
    elif s.patience <= 0:
        s.decision = "hangup"
    elif s.turn >= max_turns:
        s.decision = "timeout"
    s.delta_willingness = round(s.willingness - w0, 4)
    s.events = {"probed": sorted(appraisal["probed"]), "addressed": sorted(appraisal["addressed"]),
                "push": appraisal["push"], "off_topic": appraisal["off_topic"],
                "too_long": appraisal["too_long"], "probed_other": appraisal["probed_other"],
                "revealed": revealed, "resolved": resolved}
    return s


# --------------------------------------------------------------------------- appraisers

def _has_any(text, cues):
    return any(cue in text for cue in cues)


def lexical_appraise(agent_text, persona, rules):
    """Cue matching (lowercase substrings) against the persona's concerns and the domain bank."""
    bank = P.load_bank(persona.domain)
    text = agent_text.lower()
    mine = {c.id for c in persona.concerns}
    probed = {c.id for c in persona.concerns if _has_any(text, c.probe_cues)}
    addressed = {c.id for c in persona.concerns if _has_any(text, c.resolve_cues)}
    probed_other = any(_has_any(text, c["probe_cues"]) for c in bank["concerns"] if c["id"] not in mine)
    push = _has_any(text, bank["push_cues"])
    on_topic = _has_any(text, bank["topic_cues"]) or probed or addressed or push or probed_other
    return {"probed": probed, "addressed": addressed, "push": push, "off_topic": not on_topic,
            "too_long": len(agent_text.split()) > rules["max_agent_words"], "probed_other": probed_other}


# A few worked examples before the question: a 135M model answers yes/no near chance zero-shot, but
# follows the pattern of a handful of shots (measured: README, "llm appraiser").
YES_NO_SHOTS = [
    ("Do you have any worries about the delivery fees?", "talk about the fees", "Yes"),
    ("The weather is lovely today, isn't it?", "talk about the fees", "No"),
    ("Is your kitchen busy at lunchtime?", "talk about the kitchen", "Yes"),
    ("We have a new phone model in blue.", "talk about the contract", "No"),
]


def yes_no_prompt(agent_text, question):
    """Plain-text few-shot prompt ending in 'Answer:'; the next token is scored Yes vs No."""
    shots = "".join(f'Salesperson: "{t}"\nQuestion: Does the salesperson {q}?\nAnswer: {a}\n\n'
                    for t, q, a in YES_NO_SHOTS)
    return shots + f'Salesperson: "{agent_text}"\nQuestion: Does the salesperson {question}?\nAnswer:'


def yes_no_logodds(model, tokenizer, prompts, batch_size=16):
    """log P(Yes) - log P(No) for the next token of each prompt, with the adapter disabled (the
    simulator role). ' Yes' and 'Yes' (with and without a space) are pooled, likewise No."""
    yes = [lm.encode(tokenizer, " Yes")[0], lm.encode(tokenizer, "Yes")[0]]
    no = [lm.encode(tokenizer, " No")[0], lm.encode(tokenizer, "No")[0]]
    logp = lm.next_token_logprobs(model, tokenizer, prompts, batch_size)                     # (N, V)
    return (torch.logsumexp(logp[:, yes], -1) - torch.logsumexp(logp[:, no], -1)).tolist()


def llm_questions(persona):
    """(key, question) pairs asked about every agent turn of this persona's dialogue."""
    bank = P.load_bank(persona.domain)
    qs = [("push", "talk about signing up now"),
          ("on_topic", f"talk about {bank['title'].lower()}")]
    for c in persona.concerns:
        qs.append((f"probed:{c.id}", f"talk about {c.probe_cues[0]}"))
        qs.append((f"addressed:{c.id}", f"talk about {c.resolve_cues[0]}"))
    return qs


class LLMAppraiser:
    """Yes/no questions scored by calibrated log-odds; one batched forward for all dialogues."""

    CONTENT_FREE = "N/A"

    def __init__(self, model, tokenizer, rules):
        self.model, self.tokenizer, self.rules = model, tokenizer, rules
        self.baseline = {}  # question -> log-odds on the content-free message

    def _calibrated(self, pairs):
        """pairs: [(agent_text, question)] -> calibrated log-odds per pair."""
        fresh = sorted({q for _, q in pairs if q not in self.baseline})
        if fresh:
            base = yes_no_logodds(self.model, self.tokenizer, [yes_no_prompt(self.CONTENT_FREE, q) for q in fresh])
            self.baseline.update(zip(fresh, base))
        raw = yes_no_logodds(self.model, self.tokenizer, [yes_no_prompt(t, q) for t, q in pairs])
        return [r - self.baseline[q] for r, (_, q) in zip(raw, pairs)]

    def __call__(self, agent_texts, persona_list):
        pairs, owners = [], []
        for i, (text, persona) in enumerate(zip(agent_texts, persona_list)):
            for key, q in llm_questions(persona):
                pairs.append((text, q))
                owners.append((i, key))
        scores = self._calibrated(pairs)
        margin = self.rules["llm_margin"]
        results = [{"probed": set(), "addressed": set(), "push": False, "on_topic": False}
                   for _ in agent_texts]
        for (i, key), score in zip(owners, scores):
            yes = score > margin
            kind, _, cid = key.partition(":")
            if cid:
                if yes:
                    results[i][kind].add(cid)
            else:
                results[i][kind] = yes
        out = []
        for r, text, persona in zip(results, agent_texts, persona_list):
            lexical = lexical_appraise(text, persona, self.rules)
            on_topic = r.pop("on_topic") or bool(r["probed"] or r["addressed"] or r["push"])
            out.append({**r, "off_topic": not on_topic, "too_long": lexical["too_long"],
                        "probed_other": lexical["probed_other"]})
        return out


GENERATIVE_FORMAT = re.compile(
    r"^\s*<probed>([a-z0-9_, ]*)</probed>\s*<addressed>([a-z0-9_, ]*)</addressed>\s*"
    r"<push>(yes|no)</push>\s*<off_topic>(yes|no)</off_topic>\s*$")


def parse_generative(text, persona):
    """Strict parse of '<probed>a,b</probed><addressed>a</addressed><push>no</push><off_topic>no</off_topic>'.
    Returns the appraisal dict or None if anything is off (unknown ids included)."""
    m = GENERATIVE_FORMAT.match(text.strip().lower())
    if not m:
        return None
    ids = {c.id for c in persona.concerns}
    sets = []
    for group in m.group(1), m.group(2):
        items = {x.strip() for x in group.split(",") if x.strip() and x.strip() != "none"}
        if not items <= ids:
            return None
        sets.append(items)
    return {"probed": sets[0], "addressed": sets[1], "push": m.group(3) == "yes",
            "off_topic": m.group(4) == "yes"}


def _generative_prompt(tokenizer, agent_text, persona):
    concerns = "; ".join(f"{c.id}: {c.statement}" for c in persona.concerns)
    system = ("You annotate sales calls. Reply with exactly: <probed>ids</probed><addressed>ids</addressed>"
              "<push>yes|no</push><off_topic>yes|no</off_topic> where ids are comma-separated concern ids "
              "or none.")
    user = f"Customer concerns: {concerns}\nSalesperson said: \"{agent_text}\""
    return (lm.flat_message_ids(tokenizer, "system", system) + lm.flat_message_ids(tokenizer, "user", user)
            + lm.encode(tokenizer, lm.generation_header(tokenizer)))


def echoes(line, agent_text, n=5):
    """A user line that repeats n consecutive words of the agent's turn (all of them, for a turn of
    2-4 words) speaks the agent's part."""
    words = lambda s: re.findall(r"[a-z']+", s.lower())
    a, u = words(agent_text), words(line)
    n = min(n, len(a))
    if n < 2:
        return False
    grams = {tuple(a[k:k + n]) for k in range(len(a) - n + 1)}
    return any(tuple(u[k:k + n]) in grams for k in range(len(u) - n + 1))


# --------------------------------------------------------------------------- the simulator

class CognitiveUserSimulator:
    """Batched over dialogues. `reset(personas) -> openings`; `step(agent_messages) ->
    (user_messages, states, done)`, one entry per dialogue of the last reset (None / previous state
    for dialogues that already ended)."""

    def __init__(self, sim_cfg, model=None, tokenizer=None, seed=0, decoder=KVBatch):
        self.cfg, self.rules = sim_cfg, sim_cfg["rules"]
        self.model, self.tokenizer = model, tokenizer
        needs_model = sim_cfg["appraiser"] != "lexical" or sim_cfg["utterance"] == "llm"
        if needs_model and model is None:
            raise ValueError("this simulator configuration needs a model (appraiser or utterance is 'llm').")
        self.llm_appraiser = LLMAppraiser(model, tokenizer, self.rules) if sim_cfg["appraiser"] == "llm" else None
        self.seed, self.decoder = seed, decoder
        self.stats = {"turns": 0, "parse_failures": 0, "role_inversions": 0, "empty_turns": 0,
                      "inconsistent_lines": 0, "truncated_lines": 0}

    # -- prompts -----------------------------------------------------------------------------
    def _system_prompt(self, persona):
        bank = P.load_bank(persona.domain)
        traits = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in persona.traits.items())
        return (f"You are {persona.name}, a {bank['user_role']} ({traits}). A salesperson from "
                f"{bank['agent']['company']} is phoning you. Reply as {persona.name} only, in the first "
                f"person, in one or two short sentences. {bank['styles'][persona.style]} Never speak as "
                f"the salesperson.")

    def _instruction(self, persona, state):
        """What the user should convey this turn, from the new state (words follow state)."""
        by_id = {c.id: c for c in persona.concerns}
        ev = state.events
        parts = [f"You feel {MOODS[min(4, int(round(state.willingness)))]}."]
        if state.decision == "accept":
            parts.append("Agree to sign up now.")
        elif state.decision == "reject":
            parts.append("Refuse firmly and say goodbye.")
        elif state.decision in ("hangup", "timeout"):
            parts.append("Say you have no more time and end the call.")
        else:
            if ev["resolved"]:
                parts.append("Say this answer about your worry reassures you.")
            for cid in ev["revealed"]:
                if cid not in ev["resolved"]:
                    parts.append(f'Tell them your worry: "{by_id[cid].statement}"')
            if not ev["revealed"] and not ev["resolved"]:
                if ev["push"]:
                    parts.append("Say you are not ready to decide yet.")
                elif ev["probed_other"]:
                    parts.append("Say that this is not a problem for you.")
                else:
                    parts.append("Answer briefly. Do not mention any worry you were not asked about.")
        return " ".join(parts)

    def _template_line(self, persona, state, rng):
        bank = P.load_bank(persona.domain)
        t = bank["templates"]
        by_id = {c.id: c for c in persona.concerns}
        ev = state.events
        if state.decision in ("accept", "reject"):
            return rng.choice(t[state.decision])
        if state.decision in ("hangup", "timeout"):
            return rng.choice(t["hangup"])
        parts = [rng.choice(t["resolved"])] if ev["resolved"] else []
        parts += [by_id[c].statement for c in ev["revealed"] if c not in ev["resolved"]]
        if not parts:
            kind = "probe_no_concern" if ev["probed_other"] and not ev["push"] else "neutral"
            parts = [rng.choice(t[kind])]
        return " ".join(parts)

    def _consistent(self, line, persona, state):
        """Does a generated line carry what the state says it must?"""
        low = line.lower()
        by_id = {c.id: c for c in persona.concerns}
        if state.decision == "accept":
            return not re.search(r"\b(no|not|don't|won't)\b", low)
        if state.decision == "reject":
            return bool(re.search(r"\b(no|not|don't|won't|pass)\b", low))
        if state.decision in ("hangup", "timeout"):
            return bool(re.search(r"\b(bye|goodbye|go|time|busy|later)\b", low))
        for cid in state.events["revealed"]:
            words = set(re.findall(r"[a-z]{5,}", by_id[cid].statement.lower()))
            if not (_has_any(low, by_id[cid].probe_cues) or words & set(re.findall(r"[a-z]{5,}", low))):
                return False
        return True

    # -- the environment API -----------------------------------------------------------------
    def reset(self, persona_list, seed=None):
        """Start one dialogue per persona; the callee picks up. Returns the opening lines. `seed`
        (default: the simulator's) fixes the openings, fallback lines and sampled user lines."""
        seed = self.seed if seed is None else seed
        self.personas = list(persona_list)
        self.states = [initial_state(p, self.rules) for p in self.personas]
        # per-dialogue randomness keyed by (persona, replica), not batch position: a dialogue plays the
        # same whether it is simulated alone or in a batch
        replicas = [sum(q.persona_id == p.persona_id for q in self.personas[:i]) for i, p in enumerate(self.personas)]
        self.rngs = [random.Random(f"{seed}:{p.persona_id}:{r}") for p, r in zip(self.personas, replicas)]
        self.done = [False] * len(self.personas)
        self.generator = rollout.device_generator(seed, self.model) if self.model is not None else None
        openings = [rng.choice(P.load_bank(p.domain)["openings"]) for p, rng in zip(self.personas, self.rngs)]
        if self.cfg["utterance"] == "llm":
            tok = self.tokenizer
            self.view = self.decoder(self.model, tok.pad_token_id, adapter=False)
            for i, (p, line) in enumerate(zip(self.personas, openings)):
                self.view.add(i, lm.flat_message_ids(tok, "system", self._system_prompt(p)) +
                              lm.flat_message_ids(tok, "assistant", line))
        return openings

    def appraise(self, agent_msgs, idx):
        """Appraisals for the dialogues `idx` (batched for the model-based appraisers)."""
        ps = [self.personas[i] for i in idx]
        texts = [agent_msgs[i] for i in idx]
        kind = self.cfg["appraiser"]
        if kind == "lexical":
            return [lexical_appraise(t, p, self.rules) for t, p in zip(texts, ps)]
        if kind == "llm":
            return self.llm_appraiser(texts, ps)
        return self._generative_appraise(texts, ps)

    def _generative_appraise(self, texts, ps):
        tok = self.tokenizer
        batch = KVBatch(self.model, tok.pad_token_id, adapter=False)
        for i, (t, p) in enumerate(zip(texts, ps)):
            batch.add(i, _generative_prompt(tok, t, p))
        outs = batch.generate(self.cfg["generative_max_tokens"], {tok.eos_token_id})
        results = []
        for i, (t, p) in enumerate(zip(texts, ps)):
            lexical = lexical_appraise(t, p, self.rules)
            parsed = parse_generative(tok.decode(outs[i][0], skip_special_tokens=True), p)
            if parsed is None:
                self.stats["parse_failures"] += 1
                results.append(lexical)
            else:
                results.append({**parsed, "too_long": lexical["too_long"], "probed_other": lexical["probed_other"]})
        return results

    def abort(self, i, reason):
        """End dialogue i from outside (e.g. the policy's context is full)."""
        self.states[i].decision = reason
        self.done[i] = True
        if self.cfg["utterance"] == "llm":
            self.view.drop([i])

    def step(self, agent_msgs):
        """Advance every live dialogue by one agent turn. agent_msgs: one str per dialogue (ignored
        for finished ones). Returns (user_msgs, states, done); user_msgs[i] is None if dialogue i had
        already ended before this step."""
        live = [i for i, d in enumerate(self.done) if not d]
        user_msgs = [None] * len(self.personas)
        appraisals = self.appraise(agent_msgs, live)
        for i, a in zip(live, appraisals):
            self.states[i] = transition(self.states[i], self.personas[i], a, self.rules, self.cfg["max_turns"])
        self.stats["turns"] += len(live)
        if self.cfg["utterance"] == "template":
            for i in live:
                user_msgs[i] = self._template_line(self.personas[i], self.states[i], self.rngs[i])
        else:
            self._generate_lines(agent_msgs, live, user_msgs)
        for i in live:
            if self.states[i].decision != "continue":
                self.done[i] = True
        if self.cfg["utterance"] == "llm":
            self.view.drop([i for i in live if self.done[i]])
        return user_msgs, [copy.deepcopy(s) for s in self.states], list(self.done)

    def _generate_lines(self, agent_msgs, live, user_msgs):
        tok = self.tokenizer
        eos, closing = lm.end_of_turn_ids(tok)
        header = lm.encode(tok, lm.generation_header(tok))
        for i in live:
            ids = self.view.ids(i)
            if ids[-1] == eos:  # the previous line ended with its eos: close the message
                self.view.extend(i, closing)
            text = f"{agent_msgs[i].strip()}\n\n[{self._instruction(self.personas[i], self.states[i])}]"
            self.view.extend(i, lm.flat_message_ids(tok, "user", text) + header)
        outs = self.view.generate(self.cfg["max_new_tokens"], {eos}, temperature=self.cfg["temperature"],
                                  top_p=self.cfg["top_p"], generator=self.generator)
        for i in live:
            tokens, _ = outs[i]
            ended = bool(tokens) and tokens[-1] == eos
            raw = tok.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True)
            line = re.split(r"\n\s*\n|<\|", raw)[0].strip()  # one paragraph, no stray markers
            problem = None
            if not line:
                problem = "empty_turns"
            elif ROLE_INVERSION.search(line) or echoes(line, agent_msgs[i]):
                problem = "role_inversions"
            elif not self._consistent(line, self.personas[i], self.states[i]):
                problem = "inconsistent_lines"
            elif not ended:
                self.stats["truncated_lines"] += 1
            if problem:
                self.stats[problem] += 1
                line = self._template_line(self.personas[i], self.states[i], self.rngs[i])
            if problem or not ended or line != raw:
                # keep the simulator's own view equal to what the user actually said
                self.view.rollback(i, len(tokens))
                self.view.extend(i, lm.encode(tok, line) + [eos])
            user_msgs[i] = line


# --------------------------------------------------------------------------- demo

def main():
    import time
    import config
    parser = argparse.ArgumentParser(description="Play one dialogue: the embedded model as agent vs the simulator.")
    parser.add_argument("--domain", default="courier_recruitment", choices=P.list_domains())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. simulator.appraiser=llm")
    args = parser.parse_args()
    # the demo shows the simulator model speaking; training on the CPU defaults to bank lines
    cfg = config.load(None, ["simulator.utterance=llm", *args.overrides])
    torch.manual_seed(args.seed)
    tokenizer, model = lm.load_model(cfg["model"])
    persona = P.sample(args.domain, 1, args.seed)[0]
    print(f"persona {persona.persona_id} [{persona.stratum}] {P.public_view(persona)}")
    print("hidden concerns: " + "; ".join(f"{c.id} ({c.disclosure}, severity {c.severity})" for c in persona.concerns))
    sim = CognitiveUserSimulator(cfg["simulator"], model, tokenizer, seed=args.seed)
    t0 = time.perf_counter()
    traj = rollout.run(model, tokenizer, sim, [persona], cfg["rollout"], seed=args.seed)[0]
    states = iter(traj.states)
    for message in traj.messages:
        speaker = "agent" if message["role"] == "assistant" else "user"
        print(f"\n{speaker.upper():>6}: {message['content']}")
        if speaker == "agent":
            s = next(states)
            status = ", ".join(f"{k}={v}" for k, v in s["concern_status"].items())
            print(f"        -> willingness {s['willingness']:.2f} ({s['delta_willingness']:+.2f}), patience "
                  f"{s['patience']}, decision {s['decision']}; {status}")
    print(f"\noutcome: {traj.decision} after {traj.n_turns} agent turns, {time.perf_counter() - t0:.0f}s; "
          f"simulator health: {sim.stats}")


if __name__ == "__main__":
    main()
