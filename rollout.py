"""The dialogue loop: the policy talks to the Cognitive User Simulator, many calls at once.

`run` plays G calls per persona. All live calls advance together: one batched policy decode per turn
(kvbatch.py's `KVBatch`: each call keeps its KV cache and only its new tokens are prefilled), then the
simulator's appraisal and reply for every call at once (`simulator.step`). Finished calls leave the
batch. The result is one `Trajectory` per call: the contract with the trainer (see its docstring),
holding the token ids exactly as sampled -- the trainer never re-tokenises text.

The privileged view (`teacher_view`) is the same ids with the note of the callee's hidden concerns
inserted at the trajectory's `note_slots`, with a position map, so the teacher and the student are
compared on the same agent token.
"""

import dataclasses

import torch

import lm
import personas
from kvbatch import decoder_for, device_generator, wave_rows


@dataclasses.dataclass
class Trajectory:
    """One dialogue, as the trainer sees it. Token lists are aligned: index j describes ids[j].

    ids          policy-view (student) token ids, exactly as fed and sampled -- never re-tokenised
    agent_mask   1 where the policy sampled the token (its end-of-turn token included)
    turn_ids     the agent turn a token belongs to; context tokens carry the turn they precede
    logprobs     rollout-time log-prob of each sampled token (0.0 on context tokens)
    note_slots   where the privileged note may be inserted: after the system content
                 (`note_slots[0]`) and after the content of the user message before each agent turn
    states       the simulator's UserState (as a dict) after each agent turn
    decision     accept | reject | hangup | timeout | overflow;  reward = 1.0 iff accept
    """
    persona: object
    group: int
    ids: list
    agent_mask: list
    turn_ids: list
    logprobs: list
    note_slots: list
    messages: list
    states: list = dataclasses.field(default_factory=list)
    decision: str = "continue"
    empty_agent_turns: int = 0
    truncated_agent_turns: int = 0
    callee_cuts: int = 0            # agent turns ended where they started the callee's part (stop_at_callee)

    @property
    def reward(self):
        return 1.0 if self.decision == "accept" else 0.0

    @property
    def n_turns(self):
        return len(self.states)

    def extend(self, ids, agent=False, logprobs=None, turn=None):
        turn = self.n_turns if turn is None else turn
        self.ids.extend(ids)
        self.agent_mask.extend([int(agent)] * len(ids))
        self.turn_ids.extend([turn] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))

    def to_dict(self):
        """For samples.jsonl: the readable dialogue with hidden concerns and per-turn states, and what
        view.py needs to draw the call: the domain, the public card, each concern's severity and
        disclosure rule, and the willingness the callee started with."""
        p = self.persona
        return {"persona_id": p.persona_id, "stratum": p.stratum, "domain": p.domain,
                "public": personas.public_view(p), "willingness": p.willingness,
                "hidden_concerns": {c.id: c.statement for c in p.concerns},
                "concerns": [{"id": c.id, "statement": c.statement, "severity": c.severity,
                              "disclosure": c.disclosure} for c in p.concerns],
                "group": self.group, "decision": self.decision, "reward": self.reward,
                "messages": self.messages, "states": self.states}


def teacher_view(traj, note_ids, placement):
    """The privileged sequence for the same dialogue: the student's ids with `note_ids` (the encoded
    private view) inserted after the system content ('system') or after every user message that
    precedes an agent turn ('turn'). Returns (teacher ids, index) where index[j] is the teacher
    position of student token j, so teacher_logits[index[j] - 1] predicts the same token as
    student_logits[j - 1]."""
    slots = traj.note_slots[:1] if placement == "system" else traj.note_slots[1:]
    slots = set(slots)
    teacher, index = [], []
    for j, tok in enumerate(traj.ids):
        if j in slots:
            teacher.extend(note_ids)
        index.append(len(teacher))
        teacher.append(tok)
    return teacher, index


def start_call(tokenizer, persona, group, opening, header, note=None, privileged=None):
    """A new Trajectory up to the agent's first turn: the agent's system block (with its note slot), the
    callee's opening line and the generation header. `privileged` ('system' | 'turn') puts `note` ids in
    the policy's own view (the pilot's privileged policy)."""
    t = Trajectory(persona=persona, group=group, ids=[], agent_mask=[], turn_ids=[], logprobs=[], note_slots=[],
                   messages=[])
    opening_ids, body, closing_ids = lm.message_ids(tokenizer, "system", personas.agent_system_prompt(persona))
    t.extend(opening_ids + body)
    t.note_slots.append(len(t.ids))
    t.extend((note if privileged == "system" else []) + closing_ids)
    _user_turn(t, tokenizer, opening, header, note if privileged == "turn" else None)
    return t


def render_call(tokenizer, persona, messages, states=(), decision="continue", group=0):
    """A finished call given as text ([{role, content}], the callee first) as the Trajectory the policy
    would have produced: the same ids, agent mask and note slots as `run`, the agent's text encoded once
    (log-probs 0). For supervised data (warmstart.py) and for tests. The agent's turns end with the
    end-of-turn token (trained), the callee's last line, if any, closes the call as context."""
    eos, closing = lm.end_of_turn_ids(tokenizer)
    header = lm.encode(tokenizer, lm.generation_header(tokenizer))
    t = start_call(tokenizer, persona, group, messages[0]["content"], header)
    for k in range(1, len(messages), 2):
        t.extend(lm.encode(tokenizer, messages[k]["content"]) + [eos], agent=True)
        t.extend(closing)
        t.messages.append(messages[k])
        t.states.append(states[len(t.states)] if len(states) > len(t.states) else {})
        if k + 1 < len(messages) and k + 2 < len(messages):
            _user_turn(t, tokenizer, messages[k + 1]["content"], header)
        elif k + 1 < len(messages):
            t.messages.append(messages[k + 1])
    t.decision = decision
    return t


def _user_turn(traj, tokenizer, text, header, note=None):
    opening, body, closing = lm.message_ids(tokenizer, "user", text)
    traj.extend(opening + body)
    traj.note_slots.append(len(traj.ids))
    traj.extend((note or []) + closing + header)
    traj.messages.append({"role": "user", "content": text})


@torch.no_grad()
def note_ids(tokenizer, persona, style="concerns"):
    """The privileged note (`personas.private_view`, `aopsd.note`) as token ids, inserted after a message's
    content."""
    return lm.encode(tokenizer, "\n" + personas.private_view(persona, style))


def callee_cut(tokenizer, tokens, persona):
    """Where a sampled agent turn starts to speak as the callee ('... Customer: Hello?', 'Maria: ...'):
    the number of tokens to keep (those wholly before the label), or None if it never does. The turn
    then ends there, as a turn cut at the token budget does: the kept tokens stay as sampled, and the
    end of turn is added as context (`rollout.stop_at_callee`)."""
    pattern = personas.callee_label(persona)
    m = pattern.search(tokenizer.decode(tokens, skip_special_tokens=True))
    if not m:
        return None
    start = m.start(2)                            # where the label word begins
    keep = 0
    while keep < len(tokens) and len(tokenizer.decode(tokens[:keep + 1], skip_special_tokens=True)) <= start:
        keep += 1
    return keep


def run(model, tokenizer, simulator, persona_list, rollout_cfg, group_size=1, seed=0, progress=False,
        decoder=None, privileged=None, teacher_placement=None, note="concerns"):
    """G = group_size dialogues per persona. Returns [Trajectory], grouped by persona (group id =
    persona index). Dialogues advance together in waves of at most `wave_rows(...)` (whole persona
    groups; on the CPU one wave), which bounds the KV-cache memory of a large step. `decoder` is
    KVBatch or a drop-in with the same methods (bench.py's re-prefilling baselines). `privileged` =
    'system' or 'turn' lets the *policy* see the hidden concerns (the pilot study's privileged
    policy); trajectories are then not student views and must not be trained on. `teacher_placement`
    ('system' | 'turn'), when the trainer will build the privileged teacher view, makes
    `rollout.max_context` bound that longer view too; `note` is the note's style (`aopsd.note`).
    `progress` (True or a label) shows a bar on stderr (`_progress`)."""
    per_wave = max(1, wave_rows(model, rollout_cfg) // group_size)
    decoder = decoder or decoder_for(model, rollout_cfg)
    generator = device_generator(seed, model)
    bar = _progress(progress, len(persona_list) * group_size * simulator.cfg["max_turns"])
    trajs = []
    for start in range(0, len(persona_list), per_wave):
        groups = list(enumerate(persona_list))[start:start + per_wave]
        dialogues = [(g, p) for g, p in groups for _ in range(group_size)]
        trajs += _play(model, tokenizer, simulator, dialogues, rollout_cfg, seed, bar, decoder, privileged,
                       teacher_placement, generator, note)
    bar.close()
    return trajs


def _play(model, tokenizer, simulator, dialogues, rollout_cfg, seed, bar, decoder, privileged,
          teacher_placement, generator, note_style):
    """One wave: the dialogues [(group id, persona)] advanced together, turn by turn."""
    eos, closing = lm.end_of_turn_ids(tokenizer)
    stops = lm.stop_ids(tokenizer, model)
    header = lm.encode(tokenizer, lm.generation_header(tokenizer))
    openings = simulator.reset([p for _, p in dialogues], seed=seed)
    policy = decoder(model, tokenizer.pad_token_id, adapter=True)
    trajs, note_len = [], []
    for i, ((g, p), opening) in enumerate(zip(dialogues, openings)):
        note = note_ids(tokenizer, p, note_style) if privileged or teacher_placement else None
        note_len.append(len(note) if teacher_placement else 0)
        t = start_call(tokenizer, p, g, opening, header, note, privileged)
        policy.add(i, t.ids)
        trajs.append(t)
    max_context = rollout_cfg["max_context"]

    def teacher_extra(i):  # tokens the privileged view adds to dialogue i so far
        slots = 1 if teacher_placement == "system" else len(trajs[i].note_slots) - 1
        return note_len[i] * slots

    live = list(range(len(trajs)))
    counted, max_turns = 0, simulator.cfg["max_turns"]
    while live:
        overflow = [i for i in live
                    if len(trajs[i].ids) + teacher_extra(i) + rollout_cfg["max_new_tokens"] > max_context]
        for i in overflow:
            trajs[i].decision = "overflow"
            simulator.abort(i, "overflow")
        policy.drop(overflow)
        live = [i for i in live if i not in overflow]
        if not live:
            break
        outs = policy.generate(rollout_cfg["max_new_tokens"], stops, temperature=rollout_cfg["temperature"],
                               top_p=rollout_cfg["top_p"], generator=generator)
        agent_msgs = [None] * len(trajs)
        for i in live:
            tokens, logprobs = outs[i]
            t = trajs[i]
            keep = callee_cut(tokenizer, tokens, t.persona) if rollout_cfg["stop_at_callee"] else None
            if keep is not None:            # it started the callee's part: the turn ends before it
                policy.rollback(i, len(tokens))
                policy.extend(i, tokens[:keep])
                tokens, logprobs = tokens[:keep], logprobs[:keep]
                t.callee_cuts += 1
            t.extend(tokens, agent=True, logprobs=logprobs)
            ended = bool(tokens) and tokens[-1] in stops
            # the template's own end-of-turn token is followed by the rest of the closing; any other stop
            # token, or a turn cut at the token budget, is closed as context with the full closing
            tail = closing if tokens and tokens[-1] == eos else [eos] + closing
            t.extend(tail)
            policy.extend(i, tail)
            text = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True).strip()
            t.empty_agent_turns += not text
            t.truncated_agent_turns += not ended
            t.messages.append({"role": "assistant", "content": text})
            agent_msgs[i] = text
        user_msgs, states, done = simulator.step(agent_msgs)
        finished = []
        for i in live:
            t = trajs[i]
            t.states.append(states[i].to_dict())
            if done[i]:
                t.decision = states[i].decision
                t.messages.append({"role": "user", "content": user_msgs[i]})
                finished.append(i)
            else:
                before = len(t.ids)
                _user_turn(t, tokenizer, user_msgs[i], header,
                           note_ids(tokenizer, t.persona, note_style) if privileged == "turn" else None)
                policy.extend(i, t.ids[before:])
        policy.drop(finished)
        live = [i for i in live if i not in finished]
        budget = sum(max_turns if t.decision != "continue" else t.n_turns for t in trajs)
        bar.set_postfix_str(f"{len(trajs) - len(live)}/{len(trajs)} calls over", refresh=False)
        bar.update(budget - counted)
        counted = budget
    bar.update(len(trajs) * max_turns - counted)    # the last calls, if an overflow ended them
    return trajs


def _progress(enabled, total):
    """A tqdm bar on stderr over the calls' turn budget (calls x `max_turns`): a turn played counts
    one, a call that ends counts the rest of its budget, so the bar ends with the last call and its
    estimate of the time left assumes the live calls use their whole budget."""
    from tqdm import tqdm
    label = enabled if isinstance(enabled, str) else "rollout"
    return tqdm(total=total, desc=label, unit="turn", leave=False, disable=not enabled)
