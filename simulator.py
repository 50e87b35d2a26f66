"""Cognitive User Simulator (CUS): a simulated callee with hidden concerns and an explicit state.

    python simulator.py --domain courier_recruitment --seed 0     # one call, the state after each turn

Every call has a `UserState`: each concern's status (hidden -> revealed -> resolved), willingness on
a 0-4 scale, remaining patience, the false claims caught so far, and the decision (continue / accept
/ reject / hangup / timeout). Each agent turn is first *appraised* (appraisal.py, an `Appraisal`:
which concerns it asked about, which it answered with a true concrete fact, an open invitation to
voice worries, a push for the decision, off-topic, over-long, false claims) and the state is updated
by the transition rule below. Only then is the callee's line generated, from the persona and the
*new* state, so words and state never disagree.

Transition rule (`transition`; every number is a `simulator.rules.*` config key). It encodes the
paper's idea of proactivity: find out what the callee worries about, answer *that*, then ask.
  0. A turn that is not a salesperson's line -- it speaks as or for the callee, or repeats an
     earlier turn (`incoherent`) -- does nothing and costs `incoherent_penalty`. A turn that neither
     answers, asks about nor talks about the worry the callee has just voiced *ignores* it: it draws
     nothing out and costs `ignore_penalty`. A turn that asks about more than `max_topics` concerns
     is a *checklist*: it counts as one open probe and probes no concern specifically. A turn that
     answers more than `max_topics` concerns is a *pitch*: it resolves nothing.
  1. Asking about a hidden concern counts a probe. It is revealed (voiced by the callee) at the first
     probe if its disclosure rule is `probe` or `push`, at the second if `guarded`. A `push` concern
     is also blurted out as an objection when the agent pushes. An *open probe* ("is anything
     holding you back?", or a checklist) draws out one hidden `probe` concern, the most severe;
     `guarded` concerns are only told to a specific question, twice. Each reveal: +reveal_gain.
  2. Answering a concern with a true concrete fact resolves it only if the callee voiced it in an
     *earlier* turn: +resolve_gain x severity (1-3). Facts for concerns never voiced resolve nothing.
  3. A false claim (a statement the bank's fact contradicts, facts.py) resolves nothing that turn
     and costs `false_claim_penalty`; `false_claims_to_reject` of them end the call in a refusal.
     Pushing for a decision while any concern is unresolved: -push_penalty. Off-topic: -offtopic_penalty.
  4. Willingness is clipped to [0, 4]. Patience drops by 1 on a turn that neither revealed nor
     resolved anything, and by 1 more on an over-long turn (> max_agent_words).
  5. Decision: `accept` iff the agent pushed, every concern is resolved, the turn made no false claim
     and willingness >= accept_threshold; else `reject` if willingness <= reject_threshold or enough
     false claims were caught; else `hangup` if patience <= 0; else `timeout` once max_turns agent
     turns are spent; else `continue`. Accept is the only success.
So no cheap policy wins: a keyword stuffer or a fact dumper asks nothing and pitches; a checklist of
every topic is one open question; a pusher meets every concern as an objection and loses
willingness; a liar loses trust; a policy that knows the concerns (the privileged teacher) asks about
each, answers each once voiced, then asks. scripted_agents.py writes each kind as code, and
`python validity.py matrix` plays them against every domain (docs/simulator.md; the thresholds are tests).

User lines (`simulator.utterance`): `llm` generates them with the simulator model (the same base
with the LoRA adapter disabled, sharing no cache with the policy), guided by an instruction derived
from the new state; an empty line, a line that speaks as the agent (role inversion, including
echoing five or more of the agent's words in a row) or one that contradicts the state (e.g. a reveal
that names nothing of the concern) is replaced by a line built from the bank, and counted.
`template` builds every line from the bank (fast, deterministic). With `simulator.model` an OpenAI-compatible
URL (endpoint.py), the served model writes the lines instead -- the same instruction, the same checks and
fallback; a timeout, an error or an unusable reply falls back to the template line too, and is counted
(`endpoint_timeouts`, `endpoint_errors`, `endpoint_unusable` in `stats`).
"""

import argparse
import copy
import dataclasses
import random
import re
import zlib

import torch

import appraisal as A
import config
import endpoint as E
import kvbatch
import llm_appraisal
import lm
import personas as P
import rollout
from facts import has_cue
from kvbatch import KVBatch

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
    false_claims_caught: int = 0    # agent turns so far that contradicted the bank's facts
    events: dict = dataclasses.field(default_factory=dict)  # the latest appraisal + what changed

    def to_dict(self):
        return dataclasses.asdict(self)


def initial_state(persona, rules):
    ids = [c.id for c in persona.concerns]
    return UserState(concern_status={i: "hidden" for i in ids}, probes={i: 0 for i in ids},
                     willingness=persona.willingness, patience=rules["patience"])


# --------------------------------------------------------------------------- transition rule

def transition(state, persona, appraisal, rules, max_turns):
    """The rule of the module docstring, step by step. Pure: returns a new state. `appraisal`: what the
    turn did (appraisal.Appraisal; `incoherent` filled in by the simulator)."""
    s = copy.deepcopy(state)
    s.turn += 1
    w0 = s.willingness
    mine = {c.id for c in persona.concerns}
    false = set(appraisal.false_claims)
    incoherent = list(appraisal.incoherent)
    # the worry the callee voiced in reply to the previous turn: a turn that neither answers it, asks about
    # it nor talks about it (a false answer is still an answer) ignores it
    just_voiced = {c for c in state.events.get("revealed", ()) if s.concern_status[c] == "revealed"}
    heard = appraisal.addressed | appraisal.probed | set(appraisal.about) | false
    if just_voiced and not just_voiced & heard and not incoherent:
        incoherent.append("ignores_worry")
    void = bool(set(incoherent) - {"ignores_worry"})    # not a salesperson's line: it does nothing
    if void:
        appraisal = dataclasses.replace(appraisal, probed=set(), addressed=set(), open_probe=False, push=False)
    checklist = len(appraisal.probed) > rules["max_topics"]
    pitch = len(appraisal.addressed) > rules["max_topics"]
    probed = set() if checklist else appraisal.probed & mine
    open_probe = appraisal.open_probe or checklist
    listened = not incoherent                # an ignored or incoherent turn draws nothing out
    voiced_before = {cid for cid, status in s.concern_status.items() if status == "revealed"}
    revealed, resolved = [], []

    def reveal(c):
        s.concern_status[c.id] = "revealed"
        s.willingness += rules["reveal_gain"]
        revealed.append(c.id)

    for c in persona.concerns:
        if s.concern_status[c.id] != "hidden":
            continue
        if c.id in probed:
            s.probes[c.id] += 1
        needed = 2 if c.disclosure == "guarded" else 1
        if listened and (s.probes[c.id] >= needed or (c.disclosure == "push" and appraisal.push)):
            reveal(c)
    if open_probe and listened:
        drawn = [c for c in persona.concerns if s.concern_status[c.id] == "hidden" and c.disclosure == "probe"]
        if drawn:
            reveal(max(drawn, key=lambda c: c.severity))        # the first of the most severe
    if not pitch and not false:              # a callee who has just caught a false claim believes nothing
        for c in persona.concerns:
            if c.id in voiced_before and c.id in appraisal.addressed:
                s.concern_status[c.id] = "resolved"
                s.willingness += rules["resolve_gain"] * c.severity
                resolved.append(c.id)
    all_resolved = all(v == "resolved" for v in s.concern_status.values())
    if appraisal.push and not all_resolved:
        s.willingness -= rules["push_penalty"]
    if appraisal.off_topic:
        s.willingness -= rules["offtopic_penalty"]
    if false:
        s.willingness -= rules["false_claim_penalty"]
        s.false_claims_caught += 1
    if void:
        s.willingness -= rules["incoherent_penalty"]
    elif incoherent:
        s.willingness -= rules["ignore_penalty"]
    s.willingness = round(min(4.0, max(0.0, s.willingness)), 4)
    s.patience -= (0 if revealed or resolved else 1) + (1 if appraisal.too_long else 0)
    if appraisal.push and all_resolved and not false and s.willingness >= rules["accept_threshold"]:
        s.decision = "accept"
    elif s.willingness <= rules["reject_threshold"] or s.false_claims_caught >= rules["false_claims_to_reject"]:
        s.decision = "reject"
    elif s.patience <= 0:
        s.decision = "hangup"
    elif s.turn >= max_turns:
        s.decision = "timeout"
    s.delta_willingness = round(s.willingness - w0, 4)
    s.events = {"probed": sorted(probed), "addressed": sorted(appraisal.addressed & mine),
                "open_probe": open_probe, "push": appraisal.push, "off_topic": appraisal.off_topic,
                "too_long": appraisal.too_long, "checklist": checklist, "pitch": pitch,
                "probed_other": bool(appraisal.probed - mine) and not checklist,
                "false_claims": sorted(false), "incoherent": incoherent,
                "ignored": sorted(just_voiced) if "ignores_worry" in incoherent else [],
                "revealed": revealed, "resolved": resolved}
    return s


CALLEE_VOICE = re.compile(r"\b(this is the (owner|customer|manager)|owner speaking|i'?m the owner|"
                          r"i'?m (really |a bit |quite |so )?(worried|concerned|scared)|i (really )?worry)\b", re.I)


def speaks_for_callee(agent_text, persona):
    """Does the agent's turn speak as the callee or write the callee's part ("Customer: Hello? Sam: ...",
    "Maria: I'm not sure", "This is the owner speaking", "I'm worried about the fees")?"""
    first = re.escape(persona.name.split()[0])
    as_callee = re.compile(rf"\b(this is|i'?m|i am|my name is)\s+({re.escape(persona.name)}|{first})\b", re.I)
    return bool(P.callee_label(persona).search(agent_text) or CALLEE_VOICE.search(agent_text)
                or as_callee.search(agent_text))


def repeats_itself(agent_text, previous_turns):
    """Is the turn one of the agent's earlier turns again: word for word (punctuation and case aside), or
    nearly so (the two turns share at least 90% of their word trigrams, for turns of five or more words)?
    Re-asking one question of a longer earlier turn is not a repeat."""
    words = lambda s: re.findall(r"[a-z0-9']+", s.lower())
    trigrams = lambda w: {tuple(w[k:k + 3]) for k in range(len(w) - 2)}
    now = words(agent_text)
    if not now:
        return False
    for before in map(words, previous_turns):
        a, b = trigrams(now), trigrams(before)
        if now == before or (len(now) >= 5 and len(a & b) >= 0.9 * len(a | b)):
            return True
    return False


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

def own_model(name):
    """Does `simulator.model` name a model to load in-process (not "" = the policy's base, not a URL)?"""
    return bool(name) and not E.is_url(name)


def make_endpoint(sim_cfg):
    """The Endpoint `simulator.model` names when it is a URL (checked with one request), else None."""
    if not E.is_url(sim_cfg.get("model", "")):        # a config without the key (tests' own dicts): in-process
        return None
    ep = E.Endpoint(sim_cfg["model"], sim_cfg["endpoint_model"], sim_cfg["endpoint_timeout"])
    try:
        ep.check()
    except E.EndpointError as e:        # a user's mistake (no server there, a wrong name): one sentence
        raise config.ConfigError(str(e)) from None
    return ep


def make_appraiser(sim_cfg, model=None, tokenizer=None, endpoint=None):
    """The appraiser `simulator.appraiser` names; every one is called the same way (appraisal.py)."""
    kind, rules = sim_cfg["appraiser"], sim_cfg["rules"]
    if kind == "lexical":
        return A.LexicalAppraiser(rules)
    if kind == "semantic":
        return A.SemanticAppraiser(rules)
    if kind == "llm":
        return llm_appraisal.LLMAppraiser(model, tokenizer, rules)
    return llm_appraisal.GenerativeAppraiser(model, tokenizer, rules, sim_cfg["generative_max_tokens"], endpoint)


class CognitiveUserSimulator:
    """Batched over dialogues. `reset(personas) -> openings`; `step(agent_messages) ->
    (user_messages, states, done)`, one entry per dialogue of the last reset (None / previous state
    for dialogues that already ended). `endpoint`: an endpoint.Endpoint to use instead of the one
    `simulator.model` names (tests share one)."""

    def __init__(self, sim_cfg, model=None, tokenizer=None, seed=0, decoder=KVBatch, endpoint=None):
        self.cfg, self.rules = sim_cfg, sim_cfg["rules"]
        self.model, self.tokenizer = model, tokenizer
        self.endpoint = endpoint or make_endpoint(sim_cfg)
        kind = sim_cfg["appraiser"]
        needs_model = kind == "llm" or (self.endpoint is None and (kind == "generative" or sim_cfg["utterance"] == "llm"))
        if needs_model and model is None:
            raise ValueError("this simulator configuration needs a model (the llm/generative appraiser or llm lines).")
        self.appraiser = make_appraiser(sim_cfg, model, tokenizer, self.endpoint)
        self.seed, self.decoder = seed, decoder
        self.stats = {"turns": 0, "parse_failures": 0, "role_inversions": 0, "empty_turns": 0,
                      "inconsistent_lines": 0, "truncated_lines": 0, "generated_tokens": 0,
                      # agent turns the rule read as misinformation or as not a salesperson's line
                      "false_claims": 0, "speaks_for_callee": 0, "repeats_itself": 0, "ignores_worry": 0,
                      # simulator.model as a URL: requests sent, and those that fell back (timeout, error, no text)
                      "endpoint_requests": 0, "endpoint_timeouts": 0, "endpoint_errors": 0, "endpoint_unusable": 0}

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
            if ev["false_claims"]:
                parts.append("Say you don't believe that: it is not what you have read about them.")
            elif set(ev["incoherent"]) - {"ignores_worry"}:
                parts.append("Say you are confused about who is speaking.")
            for cid in ev["ignored"]:
                parts.append(f'Say they have not answered your worry: "{by_id[cid].statement}"')
            if ev["resolved"]:
                parts.append("Say this answer about your worry reassures you.")
            for cid in ev["revealed"]:
                if cid not in ev["resolved"]:
                    parts.append(f'Tell them your worry: "{by_id[cid].statement}"')
            if not ev["revealed"] and not ev["resolved"] and not ev["ignored"] and not ev["false_claims"]:
                if ev["push"]:
                    parts.append("Say you are not ready to decide yet.")
                elif ev["probed_other"] or ev["open_probe"]:
                    parts.append("Say that nothing like that is a problem for you.")
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
        parts = [rng.choice(t["false_claim"])] if ev["false_claims"] else \
            [rng.choice(t["incoherent"])] if set(ev["incoherent"]) - {"ignores_worry"} else []
        if ev["ignored"]:
            parts += [rng.choice(t["ignored"])] + [by_id[c].statement for c in ev["ignored"]]
        parts += [rng.choice(t["resolved"])] if ev["resolved"] else []
        parts += [by_id[c].statement for c in ev["revealed"] if c not in ev["resolved"]]
        if not parts:
            kind = "probe_no_concern" if (ev["probed_other"] or ev["open_probe"]) and not ev["push"] else "neutral"
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
            if not (has_cue(low, by_id[cid].probe_cues) or words & set(re.findall(r"[a-z]{5,}", low))):
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
        self.history = [[] for _ in self.personas]      # each dialogue's agent turns so far
        self.generator = kvbatch.device_generator(seed, self.model) if self.model is not None else None
        openings = [rng.choice(P.load_bank(p.domain)["openings"]) for p, rng in zip(self.personas, self.rngs)]
        self.seed_now = seed
        if self.cfg["utterance"] == "llm" and self.endpoint is not None:   # the same conversation, as chat messages
            self.chats = [[{"role": "system", "content": self._system_prompt(p)}, {"role": "assistant", "content": line}]
                          for p, line in zip(self.personas, openings)]
        elif self.cfg["utterance"] == "llm":
            tok = self.tokenizer
            self.view = self.decoder(self.model, tok.pad_token_id, adapter=False)
            for i, (p, line) in enumerate(zip(self.personas, openings)):
                self.view.add(i, lm.flat_message_ids(tok, "system", self._system_prompt(p)) +
                              lm.flat_message_ids(tok, "assistant", line))
        return openings

    def appraise(self, agent_msgs, idx):
        """Appraisals for the dialogues `idx` (one batched call), with what only the simulator knows: the
        concerns each callee has voiced (context for the fact check) and whether the turn is a salesperson's
        line at all (`incoherent`: it speaks for the callee, or repeats itself)."""
        ps = [self.personas[i] for i in idx]
        texts = [agent_msgs[i] for i in idx]
        voiced = [tuple(c for c, st in self.states[i].concern_status.items() if st == "revealed") for i in idx]
        out = self.appraiser(texts, [p.domain for p in ps], voiced, [[c.id for c in p.concerns] for p in ps])
        self.stats["parse_failures"] = self.appraiser.parse_failures
        if self.endpoint is not None:
            self.stats.update(self.endpoint.health())
        for i, text, p, a in zip(idx, texts, ps, out):
            a.incoherent = [reason for reason, found in (
                ("speaks_for_callee", speaks_for_callee(text, p)),
                ("repeats_itself", repeats_itself(text, self.history[i]))) if found]
        return out

    def abort(self, i, reason):
        """End dialogue i from outside (e.g. the policy's context is full)."""
        self.states[i].decision = reason
        self.done[i] = True
        if self.cfg["utterance"] == "llm" and self.endpoint is None:
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
            self.history[i].append(agent_msgs[i])
            ev = self.states[i].events
            self.stats["false_claims"] += bool(ev["false_claims"])
            for reason in ev["incoherent"]:
                self.stats[reason] += 1
        self.stats["turns"] += len(live)
        if self.cfg["utterance"] == "template":
            for i in live:
                user_msgs[i] = self._template_line(self.personas[i], self.states[i], self.rngs[i])
        elif self.endpoint is not None:
            self._endpoint_lines(agent_msgs, live, user_msgs)
        else:
            self._generate_lines(agent_msgs, live, user_msgs)
        for i in live:
            if self.states[i].decision != "continue":
                self.done[i] = True
        if self.cfg["utterance"] == "llm" and self.endpoint is None:
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
        stops = lm.stop_ids(tok, self.model)
        outs = self.view.generate(self.cfg["max_new_tokens"], stops, temperature=self.cfg["temperature"],
                                  top_p=self.cfg["top_p"], generator=self.generator)
        self.stats["generated_tokens"] += sum(len(outs[i][0]) for i in live)
        for i in live:
            tokens, _ = outs[i]
            ended = bool(tokens) and tokens[-1] in stops      # another stop token is rewritten to the template's
            raw = tok.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True)
            line = re.split(r"\n\s*\n|<\|", raw)[0].strip()  # one paragraph, no stray markers
            problem = self._line_problem(line, i, agent_msgs[i])
            if not problem and not ended:
                self.stats["truncated_lines"] += 1
            if problem:
                self.stats[problem] += 1
                line = self._template_line(self.personas[i], self.states[i], self.rngs[i])
            if problem or not ended or line != raw or tokens[-1] != eos:
                # keep the simulator's own view equal to what the user actually said
                self.view.rollback(i, len(tokens))
                self.view.extend(i, lm.encode(tok, line) + [eos])
            user_msgs[i] = line

    def _line_problem(self, line, i, agent_text):
        """Why a generated line cannot be the callee's (a `stats` key), or None."""
        if not line:
            return "empty_turns"
        if ROLE_INVERSION.search(line) or echoes(line, agent_text):
            return "role_inversions"
        if not self._consistent(line, self.personas[i], self.states[i]):
            return "inconsistent_lines"
        return None

    def _endpoint_lines(self, agent_msgs, live, user_msgs):
        """The callee's lines from the endpoint: every live dialogue's request at once, then the same checks
        as `_generate_lines`; a failed request or a bad line becomes the template line, counted."""
        requests = []
        for i in live:
            text = f"{agent_msgs[i].strip()}\n\n[{self._instruction(self.personas[i], self.states[i])}]"
            self.chats[i].append({"role": "user", "content": text})
            seed = zlib.crc32(f"{self.seed_now}:{self.personas[i].persona_id}:{i}:{self.states[i].turn}".encode())
            requests.append({"messages": list(self.chats[i]), "max_tokens": self.cfg["max_new_tokens"],
                             "temperature": self.cfg["temperature"], "top_p": self.cfg["top_p"], "seed": seed})
        for i, reply in zip(live, self.endpoint.chat_many(requests)):
            if isinstance(reply, E.EndpointError):         # counted by the endpoint (stats: endpoint_*)
                line, problem = self._template_line(self.personas[i], self.states[i], self.rngs[i]), None
            else:
                self.stats["generated_tokens"] += reply.tokens
                line = re.split(r"\n\s*\n|<\|", reply.text)[0].strip()
                problem = self._line_problem(line, i, agent_msgs[i])
                if problem:
                    self.stats[problem] += 1
                    line = self._template_line(self.personas[i], self.states[i], self.rngs[i])
                elif reply.finish_reason == "length":
                    self.stats["truncated_lines"] += 1
            self.chats[i].append({"role": "assistant", "content": line})
            user_msgs[i] = line
        self.stats.update(self.endpoint.health())


# --------------------------------------------------------------------------- demo

def main():
    import time
    parser = argparse.ArgumentParser(description="Play one dialogue (the embedded model as agent vs the simulator); "
                                                 "the validity matrix is `python validity.py matrix`.")
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
