"""Scripted agents: cheap, lying and honest policies written as code, to test the simulator's rules.

Read later. Each agent is a function `agent(obs) -> the agent's turn` that sees the public bank and
what the callee has *said* (`obs["voiced"]`: concerns voiced and not yet resolved); only the agents
that know the concerns (the privileged ones) also read `obs["persona"]`. `play_scripted` plays one
against many personas at once through the real simulator; validity.py turns that into the validity
matrix (who must win, who must not), and warmstart.py into expert calls.

Two families: agents worded from the banks (a privileged prober, and every cheap policy the rules must
defeat: keyword stuffers, topic listers, fact dumpers, pushers, echoers), and *natural* agents that
speak lines written apart from the banks (data/natural_agents*.yaml): honest ones must win, lying
ones must not.
"""

import os
import random
import re
import typing

import yaml

import personas as P
import facts
from simulator import CognitiveUserSimulator


def _expert_questions():
    path = os.path.join(P.DOMAIN_DIR, "..", "logs", "expert_questions.yaml")
    return yaml.safe_load(open(path))


DATA = os.path.join(P.DOMAIN_DIR, "..")
NATURAL_LINES = os.path.join(DATA, "natural_agents.yaml")     # held out: the table in docs/simulator.md
NATURAL_LINES_DEV = os.path.join(DATA, "natural_agents_dev.yaml")  # what the rules were tuned on
# written by someone who saw only the banks' concern descriptions and facts (data/INDEPENDENT.md)
INDEPENDENT_LINES = os.path.join(DATA, "natural_agents_independent.yaml")          # held out
INDEPENDENT_LINES_DEV = os.path.join(DATA, "natural_agents_independent_dev.yaml")  # the rules may be tuned on it


def load_natural_lines(path=None):
    """A natural-lines YAML (data/natural_agents*.yaml): {domain: {open_probes, pushes, concerns: ...}}."""
    path = path or NATURAL_LINES
    try:
        with open(path, encoding="utf-8") as f:
            lines = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise P.DomainError(f"{path}: cannot read the natural lines ({str(e).splitlines()[0]}); pass a YAML file "
                            f"like data/natural_agents.yaml.") from None
    if not isinstance(lines, dict):
        raise P.DomainError(f"{path}: must map each domain to its lines, like data/natural_agents.yaml.")
    return lines


def _answers(bank, ids):
    by_id = {c["id"]: c for c in bank["concerns"]}
    return [by_id[i]["resolution"] for i in ids]


def push_line(bank):
    return "Shall I get you started today?" if "restaurant" not in bank["user_role"] else \
        "Shall I get your restaurant listed today?"


def privileged_prober(obs):
    """Knows the hidden concerns: asks about each (a guarded one twice), answers each once voiced,
    then asks for the decision. At most two topics asked and two answered per turn."""
    bank, questions = obs["bank"], obs["questions"][obs["bank"]["name"]]
    answer = sorted(obs["voiced"])[:2]
    hidden = [c for c in obs["persona"].concerns if obs["status"][c.id] == "hidden"][:2]
    asks = [questions[c.id][min(obs["asked"].get(c.id, 0), 1)] for c in hidden]
    for c in hidden:
        obs["asked"][c.id] = obs["asked"].get(c.id, 0) + 1
    done = not hidden and set(answer) == set(obs["voiced"])
    return " ".join(_answers(bank, answer) + asks + ([push_line(bank)] if done else []))


def generic_prober(obs):
    """Knows nothing of the callee: asks about the domain's four most common concerns (the bank lists
    them first), two per turn, answers whatever the callee voices, then asks for the decision."""
    bank, questions = obs["bank"], obs["questions"][obs["bank"]["name"]]
    answer = sorted(obs["voiced"])[:2]
    common = [c["id"] for c in bank["concerns"][:4] if c["id"] not in obs["asked"]][:2]
    for cid in common:
        obs["asked"][cid] = 1
    asks = [questions[cid][0] for cid in common]
    return " ".join(_answers(bank, answer) + asks + ([] if asks else [push_line(bank)]))


def open_listener(obs):
    """Knows nothing: asks an open question, answers whatever the callee voices, asks for the decision
    once an open question draws nothing more."""
    bank = obs["bank"]
    answer = sorted(obs["voiced"])[:2]
    if obs["heard_nothing"]:
        return " ".join(_answers(bank, answer) + [push_line(bank)])
    return " ".join(_answers(bank, answer) + ["Is there anything that is holding you back?"])


def trial_closer(obs):
    """Knows nothing: asks for the decision at once to surface objections, answers what the callee
    voices, asks again (a trial close; each premature push costs willingness)."""
    bank = obs["bank"]
    return " ".join(_answers(bank, sorted(obs["voiced"])[:2]) + [push_line(bank)])


def blind_asker(obs):
    """Asks about a topic, recites its fact in the same breath and pushes; never listens."""
    bank, questions = obs["bank"], obs["questions"][obs["bank"]["name"]]
    c = bank["concerns"][(obs["turn"] - 1) % len(bank["concerns"])]
    return f"{questions[c['id']][0]} {c['resolution']} {push_line(bank)}"


def keyword_stuffer(obs):
    """Pastes a probe cue and a resolve cue of four concerns into one sentence and pushes, every turn."""
    bank = obs["bank"]
    k = 4 * (obs["turn"] - 1)
    group = [bank["concerns"][(k + j) % len(bank["concerns"])] for j in range(4)]
    words = ", ".join(f"{c['probe_cues'][0]} {c['resolve_cues'][0]}" for c in group)
    return f"We cover {words}, so {push_line(bank).lower()}"


def topic_lister(obs):
    """Asks about every topic of the bank in one question, recites every fact, pushes."""
    bank = obs["bank"]
    topics = ", ".join(c["probe_cues"][0] for c in bank["concerns"])
    return f"Is it the {topics} that worries you? " + " ".join(bank["agent"]["facts"]) + " " + push_line(bank)


def fact_dumper(obs):
    """Recites the product facts and pushes, every turn."""
    return " ".join(obs["bank"]["agent"]["facts"]) + " " + push_line(obs["bank"])


def listener_dumper(obs):
    """Listens (asks an open question), but answers anything voiced by reciting every fact."""
    bank = obs["bank"]
    facts = " ".join(bank["agent"]["facts"]) if obs["voiced"] else ""
    return f"{facts} Is there anything that is holding you back? {push_line(bank)}".strip()


def echo(obs):
    """Repeats the callee's last words back as a question, then pushes."""
    return f"You said: {obs['last_user'].rstrip('.!?')}? {push_line(obs['bank'])}"


# a figure in the callee's own words: a frequency, a span of time, a percentage or an amount
_CALLEE_FIGURE = re.compile(r"\b(every (?:single )?\w+|once an? \w+|(?:a|one|\d+) (?:day|week|month|year)s?|"
                            r"\d+(?:\.\d+)? ?(?:%|percent|per cent)|[$£€]\d+(?:\.\d+)?)\b", re.I)


def figure_echoer(obs):
    """Knows nothing and answers nothing: asks an open question, and meets a voiced worry by putting the
    figure the callee just said ("I pay my suppliers *every week*") into a sentence about something else
    ("Every week brings you to another app."), then asks for the decision. It resolves a worry wherever the
    callee's own figure is the bank's true fact, if a true figure alone answers one (it did: 7 of 90
    merchant callees, before a fact had to be in a sentence about the worry)."""
    m = _CALLEE_FIGURE.search(obs["last_user"]) if obs["voiced"] else None
    if m is None:
        return _natural_turn(obs, [], [], push=True) if obs["heard_nothing"] else _next_open_probe(obs)
    return f"{m.group(1)[0].upper()}{m.group(1)[1:]} brings you to another app. {push_line(obs['bank'])}"


# -- natural-speech agents: lines from data/natural_agents.yaml, written apart from the banks -----------

def _natural_turn(obs, answers, probes, push, close="pushes"):
    """A natural salesperson's turn: answer what the callee voiced, then ask, then (nothing left) push,
    in at most `max_agent_words` words (what does not fit waits for the next turn). `close`: the lines
    it closes with (`pushes`: an ask to decide now; `soft_closes`: an offer of time or information)."""
    rng, budget = obs["rng"], obs["max_words"]
    pushes = obs["natural"][close]
    parts = []
    ask = [pushes[obs["turn"] % len(pushes)]] if push else []      # a different closing question each turn
    for line in [rng.choice(a) for a in answers] + probes + ask:
        if sum(len(p.split()) for p in parts) + len(line.split()) <= budget or not parts:
            parts.append(line)
    return " ".join(parts)


def _answer_lines(obs, kind, cid):
    """What an agent says to the voiced worry `cid`: natural lines of `kind` (answers, false_answers,
    qualitative_lies, ...), or a line a cheating agent builds from the bank (a callable of obs and cid)."""
    return kind(obs, cid) if callable(kind) else obs["natural"]["concerns"][cid][kind]


def _natural_privileged(obs, kind, close="pushes"):
    """Knows the hidden concerns: asks about each in its own words (a guarded one twice, with another
    question), answers each once voiced with a line of `kind` (`_answer_lines`), then closes."""
    lines = obs["natural"]["concerns"]
    voiced = sorted(obs["voiced"])[:2]
    hidden = [c.id for c in obs["persona"].concerns if obs["status"][c.id] == "hidden"][:2]
    probes = [lines[cid]["probes"][obs["asked"].get(cid, 0) % len(lines[cid]["probes"])] for cid in hidden]
    for cid in hidden:
        obs["asked"][cid] = obs["asked"].get(cid, 0) + 1
    return _natural_turn(obs, [_answer_lines(obs, kind, cid) for cid in voiced], probes,
                         push=not hidden and len(obs["voiced"]) <= 2, close=close)


def _natural_listener(obs, kind, eager=False):
    """Knows nothing: asks an open question in its own words, answers whatever is voiced with a line of
    `kind`, asks for the decision once an open question draws nothing more -- or, `eager`, from its second
    turn on, beside the open question (a trial close: the callee's objections surface as they are pushed)."""
    answers = [_answer_lines(obs, kind, cid) for cid in sorted(obs["voiced"])[:2]]
    if obs["heard_nothing"]:
        return _natural_turn(obs, answers, [], push=True)
    return _natural_turn(obs, answers, [_next_open_probe(obs)], push=eager and obs["turn"] >= 2)


def _next_open_probe(obs):
    """The natural open questions in turn, never the same one twice in a call."""
    lines = obs["natural"]["open_probes"]
    return lines[(obs["turn"] + obs["open_offset"]) % len(lines)]


def natural_privileged(obs):
    return _natural_privileged(obs, "answers")


def natural_hallucinating_privileged(obs):
    return _natural_privileged(obs, "false_answers")


def natural_listener(obs):
    return _natural_listener(obs, "answers")


def natural_hallucinating_listener(obs):
    return _natural_listener(obs, "false_answers")


def eager_listener(obs):
    return _natural_listener(obs, "answers", eager=True)


# -- liars and cheats that speak naturally: each kind of lie the simulator must not pay for (issue 29) -------

def qualitative_liar_privileged(obs):
    """Knows the concerns, asks naturally, and answers each worry with a falsehood that holds no number
    ("The guarantee's only for riders who do full-time hours.": the wrong people, time or condition)."""
    return _natural_privileged(obs, "qualitative_lies")


def qualitative_liar_listener(obs):
    return _natural_listener(obs, "qualitative_lies")


def invented_figure_liar_privileged(obs):
    """Answers each worry with the fact twisted by a figure the fact never states ("No lock-in, just a $99
    admin charge when you leave.")."""
    return _natural_privileged(obs, "invented_figure_lies")


def invented_figure_liar_listener(obs):
    return _natural_listener(obs, "invented_figure_lies")


def vague_reassurer(obs):
    """Knows the concerns, asks naturally, and meets each worry with warm words and no fact."""
    return _natural_privileged(obs, "vague_answers")


def _cue_reassurance(obs, cid):
    """An empty reassurance around one of the concern's resolve cues that is no claim by itself: no figure,
    and not a condition of the fact ("Don't worry about that: guaranteed minimum, so you're covered.";
    not "... no deposit ...", which states the fact)."""
    concern = next(c for c in obs["bank"]["concerns"] if c["id"] == cid)
    book = facts.truth_book(obs["bank"])
    empty = [c for c in concern["resolve_cues"] if not facts.figures(c) and not facts.check_claims(c, {cid}, book)[1]]
    return [f"Don't worry about that: {cue}, so you're covered." for cue in (empty or concern["resolve_cues"])[:2]]


def cue_word_reassurer(obs):
    """Knows the concerns, asks naturally, and answers each worry with a resolve cue of that concern in an
    empty reassurance: a cue word passed off as the fact."""
    return _natural_privileged(obs, _cue_reassurance)


def _near_miss(obs, cid):
    """A true fact of *another* concern said under the voiced worry's topic word ("About getting paid:
    every rider has free accident insurance."): the other concern whose fact shares the most figure kinds
    with the voiced one's, so a figure check that looked at the sentence alone could mistake it."""
    concerns = obs["bank"]["concerns"]
    mine = next(c for c in concerns if c["id"] == cid)
    kinds = {f[0] for f in facts.figures(mine["resolution"])}
    others = sorted((c for c in concerns if c["id"] != cid),
                    key=lambda c: -len(kinds & {f[0] for f in facts.figures(c["resolution"])}))
    topic = mine["probe_cues"][0]
    return [f"About the {topic}: {other['resolution']}" for other in others[:2]]


def near_misser(obs):
    """Knows the concerns, asks naturally, and answers each worry with a true fact of another concern
    under that worry's topic word."""
    return _natural_privileged(obs, _near_miss)


def _shared_facts(obs, cid):
    """The product-fact lines of the bank that hold resolve cues of several concerns (a line about
    everything, e.g. 'Thermal bag, rain jacket and phone mount provided free, no deposit.'), those linked
    to the voiced worry first."""
    bank = obs["bank"]
    linked = lambda line: [c["id"] for c in bank["concerns"] if facts.has_cue(line.lower(), c["resolve_cues"])]
    shared = sorted(bank["agent"]["facts"], key=lambda line: (cid not in linked(line), -len(linked(line))))
    return [line for line in shared if len(linked(line)) >= 2][:2] or shared[:1]


def shared_fact_sprayer(obs):
    """Knows the concerns, asks naturally, and answers each worry by reciting the product facts that are
    linked to the most concerns: a line about many things, hoping one of them counts."""
    return _natural_privileged(obs, _shared_facts)


def soft_closer(obs):
    """The honest natural privileged agent (independent lines) that never asks for the decision: it offers
    a call back, time to think or a link with more information instead."""
    return _natural_privileged(obs, "answers", close="soft_closes")


def independent_privileged(obs):
    return _natural_privileged(obs, "answers")


def independent_listener(obs):
    return _natural_listener(obs, "answers")


BLUFFS = ["Honestly, it's only 5 percent, nothing to worry about.", "It's just ten dollars, hardly anything.",
          "That takes a day at most, so no stress.", "You'd get paid every single day, so that's fine."]


def number_bluffer(obs):
    """Knows nothing: asks an open question and meets every worry with a made-up figure ("it's only 5
    percent, nothing to worry about"), then asks for the decision."""
    if obs["heard_nothing"]:
        return _natural_turn(obs, [], [], push=True)
    bluffs = [BLUFFS[(obs["turn"] + k) % len(BLUFFS)] for k in range(min(2, len(obs["voiced"])))]
    return " ".join(bluffs + [_next_open_probe(obs)])


def pusher(obs):
    return "Would you like to sign up today?"


def passive(obs):
    return "Lovely weather today, isn't it? How has your week been?"


class Agent(typing.NamedTuple):
    policy: typing.Callable     # obs -> the agent's turn
    knows: bool                 # knows the hidden concerns (reads obs["persona"])
    asks: bool                  # asks questions
    lines: str = "bank"         # whose words it speaks: bank (the banks' own), natural (data/natural_agents*.yaml)
                                # or independent (data/natural_agents_independent*.yaml)


SCRIPTED_AGENTS = {
    "privileged prober": Agent(privileged_prober, True, True),
    "generic prober": Agent(generic_prober, False, True),
    "open listener": Agent(open_listener, False, True),
    "trial closer": Agent(trial_closer, False, False),
    "blind asker": Agent(blind_asker, False, True),
    "keyword stuffer": Agent(keyword_stuffer, False, False),
    "topic lister": Agent(topic_lister, False, True),
    "fact dumper": Agent(fact_dumper, False, False),
    "listener + fact dump": Agent(listener_dumper, False, True),
    "echo": Agent(echo, False, False),
    "figure echoer": Agent(figure_echoer, False, True, "natural"),
    "pusher": Agent(pusher, False, False),
    "passive": Agent(passive, False, False),
    "natural privileged": Agent(natural_privileged, True, True, "natural"),
    "natural listener": Agent(natural_listener, False, True, "natural"),
    "eager listener": Agent(eager_listener, False, True, "natural"),
    "natural hallucinating privileged": Agent(natural_hallucinating_privileged, True, True, "natural"),
    "natural hallucinating listener": Agent(natural_hallucinating_listener, False, True, "natural"),
    "number bluffer": Agent(number_bluffer, False, True, "natural"),
    "independent privileged": Agent(independent_privileged, True, True, "independent"),
    "independent listener": Agent(independent_listener, False, True, "independent"),
    "qualitative liar (privileged)": Agent(qualitative_liar_privileged, True, True, "independent"),
    "qualitative liar (listener)": Agent(qualitative_liar_listener, False, True, "independent"),
    "invented-figure liar (privileged)": Agent(invented_figure_liar_privileged, True, True, "independent"),
    "invented-figure liar (listener)": Agent(invented_figure_liar_listener, False, True, "independent"),
    "vague reassurer": Agent(vague_reassurer, True, True, "independent"),
    "cue-word reassurer": Agent(cue_word_reassurer, True, True, "independent"),
    "near-misser": Agent(near_misser, True, True, "independent"),
    "shared-fact sprayer": Agent(shared_fact_sprayer, True, True, "independent"),
    "soft closer": Agent(soft_closer, True, True, "independent"),
}


def play_scripted(agent, personas, sim_cfg, seed=0, natural_lines=None, transcripts=None):
    """Play one scripted agent against every persona (batched), -> list of final states. Every agent
    sees the public bank and what the callee has *said* (`voiced`: concerns voiced and not yet
    resolved); only the privileged agent also sees `persona`. `transcripts`, a list, receives each call
    as [(role, content)] messages with the state after every agent turn (warmstart.py's data)."""
    sim = CognitiveUserSimulator({**sim_cfg, "utterance": "template"}, seed=seed)
    openings = sim.reset(personas)
    calls = [{"messages": [{"role": "user", "content": line}], "states": []} for line in openings]
    questions, natural = _expert_questions(), load_natural_lines(natural_lines)
    obs = [{"persona": p, "bank": P.load_bank(p.domain), "questions": questions, "asked": {}, "turn": 0,
            "max_turns": sim_cfg["max_turns"], "voiced": set(), "status": dict(sim.states[i].concern_status),
            "heard_nothing": False, "last_user": line, "natural": natural.get(p.domain),
            "rng": random.Random(f"{seed}:{p.persona_id}"), "max_words": sim_cfg["rules"]["max_agent_words"],
            "open_offset": random.Random(f"{seed}:{p.persona_id}:open").randrange(6)}
           for i, (p, line) in enumerate(zip(personas, openings))]
    while not all(sim.done):
        msgs = []
        for o, done in zip(obs, sim.done):
            o["turn"] += 1
            msgs.append(None if done else agent(o))
        users, states, _ = sim.step(msgs)
        for o, user, state, msg, call in zip(obs, users, states, msgs, calls):
            if user is not None:
                call["messages"] += [{"role": "assistant", "content": msg}, {"role": "user", "content": user}]
                call["states"].append(state.to_dict())
                o["status"] = dict(state.concern_status)
                o["voiced"] = {cid for cid, st in state.concern_status.items() if st == "revealed"}
                o["heard_nothing"] = state.events["open_probe"] and not state.events["revealed"]
                o["last_user"] = user
    if transcripts is not None:
        transcripts += [{**call, "decision": state.decision} for call, state in zip(calls, sim.states)]
    return sim.states
