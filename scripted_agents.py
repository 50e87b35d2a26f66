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

import yaml

import personas as P
from simulator import CognitiveUserSimulator

def _expert_questions():
    path = os.path.join(P.DOMAIN_DIR, "..", "logs", "expert_questions.yaml")
    return yaml.safe_load(open(path))


NATURAL_LINES = os.path.join(P.DOMAIN_DIR, "..", "natural_agents.yaml")     # held out: the table in docs/simulator.md
NATURAL_LINES_DEV = os.path.join(P.DOMAIN_DIR, "..", "natural_agents_dev.yaml")  # what the rules were tuned on


def load_natural_lines(path=None):
    return yaml.safe_load(open(path or (NATURAL_LINES if os.path.exists(NATURAL_LINES) else NATURAL_LINES_DEV)))


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

def _natural_turn(obs, answers, probes, push):
    """A natural salesperson's turn: answer what the callee voiced, then ask, then (nothing left) push,
    in at most `max_agent_words` words (what does not fit waits for the next turn)."""
    rng, budget = obs["rng"], obs["max_words"]
    pushes = obs["natural"]["pushes"]
    parts = []
    ask = [pushes[obs["turn"] % len(pushes)]] if push else []      # a different closing question each turn
    for line in [rng.choice(a) for a in answers] + probes + ask:
        if sum(len(p.split()) for p in parts) + len(line.split()) <= budget or not parts:
            parts.append(line)
    return " ".join(parts)


def _natural_privileged(obs, kind):
    """Knows the hidden concerns: asks about each in its own words (a guarded one twice, with another
    question), answers each once voiced with a natural line of `kind` (answers | false_answers), then asks."""
    lines = obs["natural"]["concerns"]
    voiced = sorted(obs["voiced"])[:2]
    hidden = [c.id for c in obs["persona"].concerns if obs["status"][c.id] == "hidden"][:2]
    probes = [lines[cid]["probes"][obs["asked"].get(cid, 0) % len(lines[cid]["probes"])] for cid in hidden]
    for cid in hidden:
        obs["asked"][cid] = obs["asked"].get(cid, 0) + 1
    return _natural_turn(obs, [lines[cid][kind] for cid in voiced], probes, push=not hidden and len(obs["voiced"]) <= 2)


def _natural_listener(obs, kind):
    """Knows nothing: asks an open question in its own words, answers whatever is voiced with a natural line
    of `kind`, asks for the decision once an open question draws nothing more."""
    lines = obs["natural"]["concerns"]
    answers = [lines[cid][kind] for cid in sorted(obs["voiced"])[:2]]
    if obs["heard_nothing"]:
        return _natural_turn(obs, answers, [], push=True)
    return _natural_turn(obs, answers, [_next_open_probe(obs)], push=False)


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


NATURAL_AGENTS = ("natural privileged", "natural listener", "natural hallucinating privileged",
                  "natural hallucinating listener", "number bluffer")
SCRIPTED_AGENTS = {   # name -> (policy, knows the hidden concerns, asks questions)
    "privileged prober": (privileged_prober, True, True),
    "generic prober": (generic_prober, False, True),
    "open listener": (open_listener, False, True),
    "trial closer": (trial_closer, False, False),
    "blind asker": (blind_asker, False, True),
    "keyword stuffer": (keyword_stuffer, False, False),
    "topic lister": (topic_lister, False, True),
    "fact dumper": (fact_dumper, False, False),
    "listener + fact dump": (listener_dumper, False, True),
    "echo": (echo, False, False),
    "figure echoer": (figure_echoer, False, True),
    "pusher": (pusher, False, False),
    "passive": (passive, False, False),
    "natural privileged": (natural_privileged, True, True),
    "natural listener": (natural_listener, False, True),
    "natural hallucinating privileged": (natural_hallucinating_privileged, True, True),
    "natural hallucinating listener": (natural_hallucinating_listener, False, True),
    "number bluffer": (number_bluffer, False, True),
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
