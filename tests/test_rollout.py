"""The rollout contract: tokens as generated, greedy parity with `generate`, batch invariance,
rollout-time log-probs equal a fresh forward pass, teacher/student alignment, seeded reproducibility."""
import pytest
import torch

import lm
import personas as P
import rollout
import simulator as S
from conftest import make_tiny_model


def input_ids_of_logits(args, kwargs):
    """The input token at each position whose logits a forward returned (all, the last k, or the
    positions of a `logits_to_keep` tensor, as KVBatch's prefill asks)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    keep = kwargs.get("logits_to_keep", 0)
    if isinstance(keep, torch.Tensor):
        return ids[:, keep]
    return ids[:, -keep:] if keep else ids


@pytest.fixture
def stopping_model(tokenizer):
    return make_stopping_model(tokenizer)


def make_stopping_model(tokenizer):
    """A tiny random model that ends its turn after roughly one token in five (whenever the input
    token id is a multiple of 5), so agent turns end at different lengths within one batch -- the
    padding and position-id traps need that. A forward hook, so `generate` sees it too."""
    model = make_tiny_model(tokenizer, seed=1)
    eos = tokenizer.eos_token_id

    def favour_eos(module, args, kwargs, output):
        ids = input_ids_of_logits(args, kwargs)
        output.logits[..., eos] += 10.0 * (ids % 5 == 0).to(output.logits.dtype)
        return output

    model.register_forward_hook(favour_eos, with_kwargs=True)
    return model


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


def test_kvbatch_rollback_and_new_rows(tokenizer, stopping_model):
    """Rolling back generated tokens and adding a row mid-way decode exactly like fresh sequences."""
    eos = tokenizer.eos_token_id
    a = lm.encode(tokenizer, "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
    b = lm.encode(tokenizer, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    batch = rollout.KVBatch(stopping_model, tokenizer.pad_token_id)
    batch.add("a", a)
    out = batch.generate(5, {eos})
    batch.rollback("a", len(out["a"][0]))
    assert batch.ids("a") == a
    batch.add("b", b)
    out = batch.generate(5, {eos})
    fresh = rollout.KVBatch(stopping_model, tokenizer.pad_token_id)
    fresh.add("a", a)
    fresh.add("b", b)
    again = fresh.generate(5, {eos})
    for key in "ab":
        assert again[key][0] == out[key][0]
        torch.testing.assert_close(torch.tensor(again[key][1]), torch.tensor(out[key][1]))


@pytest.mark.parametrize("batched", [True, False])
def test_bench_baselines_play_the_same_dialogues(cfg, tokenizer, stopping_model, batched):
    """bench.py compares decoders on identical work: its re-prefilling `generate` baselines must
    reproduce the KV engine's greedy dialogues."""
    import bench
    sim, roll_cfg, people = setup(cfg, tokenizer, stopping_model)
    kv = rollout.run(stopping_model, tokenizer, sim, people, roll_cfg)
    made = []

    def decoder(model, pad_id, adapter=True):
        made.append(bench.GenerateBatch(model, pad_id, adapter, batched=batched))
        return made[-1]

    sim2, _, _ = setup(cfg, tokenizer, stopping_model)
    sim2.decoder = decoder
    base = rollout.run(stopping_model, tokenizer, sim2, people, roll_cfg, decoder=decoder)
    assert [t.ids for t in base] == [t.ids for t in kv]
    assert sum(d.prefill_tokens for d in made) > 0 and sum(d.generated_tokens for d in made) > 0


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


def test_sampling_matches_the_distribution_and_the_nucleus():
    """Inverse-CDF sampling draws from softmax(logits / T); with top-p it keeps exactly the tokens
    transformers' TopPLogitsWarper keeps, and never samples a token outside them."""
    from transformers.generation.logits_process import TopPLogitsWarper
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    gen = rollout.device_generator(1, "cpu")
    draws = torch.cat([rollout.sample_next(logits.expand(4000, -1), 0.8, 1.0, gen)[0] for _ in range(5)])
    freq = torch.bincount(draws, minlength=12).float() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.8, -1), atol=0.01, rtol=0)
    kept = TopPLogitsWarper(0.7)(None, logits / 0.8).isfinite()[0]
    tokens, logprobs = rollout.sample_next(logits.expand(20000, -1), 0.8, 0.7, gen)
    assert set(tokens.tolist()) == set(kept.nonzero().squeeze(-1).tolist())
    expected = torch.log_softmax(logits[0] / 0.8, -1)[tokens]          # recorded at T, before the nucleus
    torch.testing.assert_close(logprobs, expected)


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


def test_dialogues_of_one_persona_share_their_prompts_prefill_and_play_the_same(cfg, tokenizer):
    """KVBatch computes a prefix the G rollouts of a persona share (its system prompt) once and copies its
    cache slots: the greedy dialogues are the very ones played without sharing, the log-probs agree to
    float rounding, and far fewer tokens are prefilled."""
    model = make_stopping_model(tokenizer)
    people = P.sample_many(["merchant_recruitment", "courier_recruitment"], 2, seed=0)
    batches = []

    def play(share):
        class Decoder(rollout.KVBatch):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, "share_prefix": share})
                batches.append(self)
        sim = S.CognitiveUserSimulator({**cfg["simulator"], "appraiser": "lexical", "utterance": "template"}, seed=0)
        return rollout.run(model, tokenizer, sim, people, {**cfg["rollout"], "temperature": 0.0, "max_new_tokens": 8},
                           group_size=3, decoder=Decoder)

    plain, shared = play(False), play(True)
    assert [t.ids for t in plain] == [t.ids for t in shared]
    assert max(abs(a - b) for p, s in zip(plain, shared) for a, b in zip(p.logprobs, s.logprobs)) < 1e-4
    system = len(lm.message_ids(tokenizer, "system", P.agent_system_prompt(people[0]))[1])
    assert batches[1].prefill_tokens < batches[0].prefill_tokens - 2 * 2 * system     # 2 of 3 rows skip it
