"""The rollout contract (rollout.py): tokens as generated, greedy parity with `generate`, batch invariance,
rollout-time log-probs equal a fresh forward pass, teacher/student alignment, seeded reproducibility."""
import pytest
import torch

import lm
import personas as P
import rollout
import simulator as S
from conftest import input_ids_of_logits, make_tiny_model


def setup(cfg, tokenizer, model, n=3, utterance="llm", temperature=0.0, seed=0):
    sim_cfg = {**cfg["simulator"], "utterance": utterance, "max_turns": 4, "max_new_tokens": 6,
               "temperature": temperature,
               "rules": {**cfg["simulator"]["rules"], "patience": 10}}
    sim = S.CognitiveUserSimulator(sim_cfg, model, tokenizer, seed=seed)
    roll_cfg = {**cfg["rollout"], "max_new_tokens": 10, "temperature": temperature}
    people = P.sample_many(["merchant_recruitment", "courier_recruitment", "broadband_switch"], n, seed=0)
    return sim, roll_cfg, people


def agent_turns(traj):
    """[(start index, end index)] of each agent turn's sampled tokens."""
    spans, start = [], None
    for j, m in enumerate(traj.agent_mask + [0]):
        if m and start is None:
            start = j
        if not m and start is not None:
            spans.append((start, j))
            start = None
    return spans


def test_greedy_rollout_matches_generate_every_turn(cfg, tokenizer, stopping_model):
    sim, roll_cfg, people = setup(cfg, tokenizer, stopping_model)
    trajs = rollout.run(stopping_model, tokenizer, sim, people, roll_cfg, group_size=2)
    lengths = set()
    checked = 0
    for t in trajs:
        assert len(t.ids) == len(t.agent_mask) == len(t.turn_ids) == len(t.logprobs)
        for turn, (a, b) in enumerate(agent_turns(t)):
            context = torch.tensor([t.ids[:a]])
            ref = stopping_model.generate(context, attention_mask=torch.ones_like(context), do_sample=False,
                                          max_new_tokens=roll_cfg["max_new_tokens"],
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            assert ref[0, a:].tolist() == t.ids[a:b], f"turn {turn} differs from generate"
            assert set(t.turn_ids[a:b]) == {turn}
            lengths.add(b - a)
            checked += 1
    assert checked >= 8 and len(lengths) >= 3          # many turns, of different lengths, in one batch
    assert any(t.ids[b - 1] == tokenizer.eos_token_id for t in trajs for a, b in agent_turns(t))


def test_batched_equals_unbatched(cfg, tokenizer, stopping_model):
    sim, roll_cfg, people = setup(cfg, tokenizer, stopping_model)
    together = rollout.run(stopping_model, tokenizer, sim, people, roll_cfg)
    for p, t in zip(people, together):
        alone = rollout.run(stopping_model, tokenizer, sim, [p], roll_cfg)[0]
        assert alone.ids == t.ids and alone.messages == t.messages and alone.states == t.states


def test_rollout_logprobs_equal_a_fresh_forward_pass(cfg, tokenizer, stopping_model):
    sim, roll_cfg, people = setup(cfg, tokenizer, stopping_model, temperature=0.8)
    trajs = rollout.run(stopping_model, tokenizer, sim, people, roll_cfg, group_size=2, seed=5)
    for t in trajs:
        ids = torch.tensor([t.ids])
        with torch.no_grad():
            logits = stopping_model(ids).logits
        fresh = lm.token_logprobs(logits[:, :-1], ids[:, 1:], temperature=0.8)[0]
        mask = torch.tensor(t.agent_mask[1:], dtype=torch.bool)
        recorded = torch.tensor(t.logprobs[1:])
        assert mask.sum() > 0
        torch.testing.assert_close(recorded[mask], fresh[mask], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("placement", ["system", "turn"])
def test_teacher_and_student_sequences_align(cfg, tokenizer, stopping_model, placement):
    sim, roll_cfg, people = setup(cfg, tokenizer, stopping_model)
    t = rollout.run(stopping_model, tokenizer, sim, people[:1], roll_cfg)[0]
    note = lm.encode(tokenizer, "\n" + P.private_view(t.persona))
    teacher, index = rollout.teacher_view(t, note, placement)
    inserts = 1 if placement == "system" else t.n_turns
    assert len(teacher) == len(t.ids) + inserts * len(note)
    for j, tok in enumerate(t.ids):
        assert teacher[index[j]] == tok
    agent = [j for j, m in enumerate(t.agent_mask) if m]
    # every agent token is preceded by the note in the teacher (before its turn), never inside a turn
    for j in agent:
        assert index[j] - j == len(note) * (1 if placement == "system" else t.turn_ids[j] + 1)
    text = tokenizer.decode(teacher)
    assert text.count(P.private_view(t.persona)) == inserts


def test_seeded_sampled_rollout_is_reproducible(cfg, tokenizer, stopping_model):
    runs = []
    for _ in range(2):
        sim, roll_cfg, people = setup(cfg, tokenizer, stopping_model, temperature=1.0, seed=3)
        runs.append(rollout.run(stopping_model, tokenizer, sim, people, roll_cfg, group_size=2, seed=3))
    assert [t.ids for t in runs[0]] == [t.ids for t in runs[1]]
    sim, roll_cfg, people = setup(cfg, tokenizer, stopping_model, temperature=1.0, seed=3)
    other = rollout.run(stopping_model, tokenizer, sim, people, roll_cfg, group_size=2, seed=4)
    assert [t.ids for t in other] != [t.ids for t in runs[0]]


def test_context_overflow_ends_cleanly(cfg, tokenizer, stopping_model):
    sim, roll_cfg, people = setup(cfg, tokenizer, stopping_model)
    roll_cfg["max_context"] = 560
    trajs = rollout.run(stopping_model, tokenizer, sim, people, roll_cfg)
    assert any(t.decision == "overflow" and t.n_turns >= 1 for t in trajs)
    for t in trajs:
        for a, b in agent_turns(t):   # no turn was started without room for a full turn
            assert a + roll_cfg["max_new_tokens"] <= roll_cfg["max_context"]
        if t.decision == "overflow":
            assert t.reward == 0.0 and len(t.ids) + roll_cfg["max_new_tokens"] > roll_cfg["max_context"]


def test_empty_agent_turns_are_recorded_not_fatal(cfg, tokenizer):
    """A policy that ends every turn at once: each turn is recorded as empty, the simulator appraises
    the silence (off-topic, patience lost) and the call ends by the rule, not by a crash."""
    model = make_tiny_model(tokenizer, seed=2)
    eos, newline = tokenizer.eos_token_id, lm.encode(tokenizer, "\n")[0]

    def silent(module, args, kwargs, output):
        ids = input_ids_of_logits(args, kwargs)
        output.logits[..., eos] += 100.0 * (ids == newline).to(output.logits.dtype)
        return output

    model.register_forward_hook(silent, with_kwargs=True)
    sim, roll_cfg, people = setup(cfg, tokenizer, model, utterance="template")
    trajs = rollout.run(model, tokenizer, sim, people, roll_cfg)
    for t in trajs:
        assert t.n_turns >= 1 and t.empty_agent_turns == t.n_turns
        assert all(m["content"] == "" for m in t.messages if m["role"] == "assistant")
        assert all(s["events"]["off_topic"] for s in t.states)
        assert t.decision in ("hangup", "reject", "timeout")


def test_waves_play_the_same_greedy_dialogues(tokenizer, cfg):
    """Dialogues advanced in waves of two persona groups equal one batch of all (greedy)."""
    import simulator as S
    model = make_tiny_model(tokenizer)
    people = P.sample("courier_recruitment", 5, seed=2)
    sim_cfg = {**cfg["simulator"], "utterance": "llm", "appraiser": "lexical", "max_turns": 2, "temperature": 0.0,
               "max_new_tokens": 5}
    roll = {**cfg["rollout"], "max_new_tokens": 5, "temperature": 0.0}
    runs = {}
    for wave in (0, 4):
        sim = S.CognitiveUserSimulator(sim_cfg, model, tokenizer, seed=0)
        trajs = rollout.run(model, tokenizer, sim, people, {**roll, "wave_rows": wave}, group_size=2)
        runs[wave] = ([t.ids for t in trajs], [t.group for t in trajs], sim.stats["generated_tokens"])
    assert runs[0] == runs[4]
    assert runs[4][1] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and runs[4][2] > 0
