"""The KV engines (kvbatch.py): KVBatch's rollback, new rows, shared prefixes and sampling; the static-shape
engine (StaticKVBatch, `rollout.compile`) plays the same dialogues as the eager one -- compiled or not, for the
adapter-on policy and the adapter-off simulator view, across row buckets, calls leaving the batch and
rollbacks -- with a bounded number of compilations; memory-sized waves in the model's real dtype."""
import functools

import pytest
import torch

import kvbatch
import lm
import personas as P
import rollout
import simulator as S
from conftest import make_stopping_model, make_tiny_model


def lora_policy(tokenizer):
    """A tiny model whose LoRA adapter changes its outputs (B initialised non-zero), so the policy view
    (adapter on) and the simulator view (adapter off) are different models."""
    model = lm.add_lora(make_stopping_model(tokenizer), {"r": 4, "alpha": 8, "dropout": 0.0,
                                                         "target_modules": ["q_proj", "v_proj"]})
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.5
    return model.eval()


def play(cfg, tokenizer, model, decoder, temperature=0.0, stop_at_callee=True):
    """Three personas x 2 calls of up to 4 turns with the simulator speaking through the model (its
    adapter-off view): calls end at different turns, so rows leave the batch and buckets shrink."""
    sim_cfg = {**cfg["simulator"], "utterance": "llm", "appraiser": "lexical", "max_turns": 4, "max_new_tokens": 6,
               "temperature": temperature, "rules": {**cfg["simulator"]["rules"], "patience": 2}}
    sim = S.CognitiveUserSimulator(sim_cfg, model, tokenizer, seed=0, decoder=decoder)
    roll = {**cfg["rollout"], "max_new_tokens": 8, "temperature": temperature, "stop_at_callee": stop_at_callee}
    people = P.sample_many(["merchant_recruitment", "courier_recruitment", "broadband_switch"], 3, seed=0)
    return rollout.run(model, tokenizer, sim, people, roll, group_size=2, seed=4, decoder=decoder)


def assert_same(a, b, atol=1e-4):
    assert [t.ids for t in a] == [t.ids for t in b]
    assert [t.messages for t in a] == [t.messages for t in b]
    assert [t.decision for t in a] == [t.decision for t in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=atol, rtol=0)


def test_row_buckets_hold_the_rows_and_waste_under_a_third():
    sizes = [kvbatch.row_bucket(n) for n in range(1, 200)]
    assert sizes[:9] == [1, 2, 3, 4, 6, 6, 8, 8, 12]
    assert all(b >= n and (b - n) / b < 1 / 3 for n, b in enumerate(sizes, 1))
    assert sizes == sorted(sizes) and len(set(sizes)) <= 2 * 8 + 1      # O(log n) shapes up to 199 rows


def test_static_layout_plays_the_eager_engines_dialogues(cfg, tokenizer):
    """The fixed-capacity cache, uncompiled: the eager engine's greedy and sampled dialogues exactly,
    with rows bucketed, calls leaving, turns cut at the callee's part (rollbacks) and the cache growing
    past a block."""
    model = lora_policy(tokenizer)
    static = functools.partial(kvbatch.StaticKVBatch, compile=False)
    for temperature in (0.0, 0.7):
        ref = play(cfg, tokenizer, model, kvbatch.KVBatch, temperature)
        out = play(cfg, tokenizer, model, static, temperature)
        assert_same(ref, out)
    assert len({t.decision for t in ref}) > 1 or len({len(t.ids) for t in ref}) > 1    # calls end apart
    assert max(len(t.ids) for t in ref) > kvbatch.StaticKVBatch.BLOCK                 # capacity grew


def test_static_batch_buckets_shrink_and_rollback(tokenizer):
    """Rows leave: the buffers shrink to the next bucket only when the live rows fit it; a rollback hides
    the forgotten slots; a new row joins an existing static batch."""
    model = make_tiny_model(tokenizer)
    batch = kvbatch.StaticKVBatch(model, tokenizer.pad_token_id, compile=False)
    for i in range(10):
        batch.add(i, [1, 2, 3 + i, 4, 5][:2 + i % 4])
    batch.generate(3, {tokenizer.eos_token_id})
    assert batch.static and len(batch.phys) == 12 and batch.phys[10:] == [None, None]
    batch.drop([0])
    assert len(batch.phys) == 12 and batch.phys[0] is None     # 9 live rows: still bucket 12, a free row
    batch.drop([5])
    assert batch.phys == [1, 2, 3, 4, 6, 7, 8, 9]              # 8 live rows fit bucket 8: regrouped
    before = list(batch.ids(3))
    batch.rollback(3, 2)
    assert batch.ids(3) == before[:-2]
    batch.add(10, [5, 6, 7])
    assert len(batch.phys) == 12 and batch.phys[8] == 10      # a ninth row: the next bucket
    out = batch.generate(4, {tokenizer.eos_token_id})
    assert set(out) == set(batch.keys) == {1, 2, 3, 4, 6, 7, 8, 9, 10}
    assert not torch.isnan(batch.cache.layers[0].keys).any()

    eager = kvbatch.KVBatch(model, tokenizer.pad_token_id)
    for k in batch.keys:
        eager.add(k, batch.ids(k))
    again = batch.generate(4, {tokenizer.eos_token_id})
    ref = eager.generate(4, {tokenizer.eos_token_id})
    assert {k: v[0] for k, v in again.items()} == {k: v[0] for k, v in ref.items()}


def test_compiled_step_equals_eager_with_bounded_recompilation(cfg, tokenizer):
    """torch.compile'd decode step (inductor on the CPU): the eager engine's dialogues token for token
    for both views, log-probs within 1e-4; one graph per (row bucket, capacity, view) shape seen, and a
    second rollout of the same shapes compiles nothing new."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    kvbatch._STEPS.clear()
    model = lora_policy(tokenizer)
    ref = play(cfg, tokenizer, model, kvbatch.KVBatch)
    shapes = set()
    original = kvbatch.StaticKVBatch._step

    def spy(self, step_ids, active):
        shapes.add((tuple(self.mask.shape), self.adapter))
        return original(self, step_ids, active)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kvbatch.StaticKVBatch, "_step", spy)
        out = play(cfg, tokenizer, model, kvbatch.StaticKVBatch)
        graphs = counters["stats"]["unique_graphs"]
        again = play(cfg, tokenizer, model, kvbatch.StaticKVBatch)
    assert_same(ref, out)
    assert_same(out, again, atol=0)
    assert {adapter for _, adapter in shapes} == {True, False}
    assert 2 <= graphs <= len(shapes)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_setting_picks_the_engine(cfg, tokenizer):
    model = make_tiny_model(tokenizer)
    roll = cfg["rollout"]
    for choice in ("off", "auto"):                                                       # auto on the CPU: eager
        for fold in (True, False):
            eager = kvbatch.decoder_for(model, {**roll, "compile": choice, "fold_adapter": fold})
            assert eager.func is kvbatch.KVBatch and eager.keywords == {"fold": fold}
    on = kvbatch.decoder_for(model, {**roll, "compile": "on"})
    assert on.func is kvbatch.StaticKVBatch and on.keywords["capacity"] is None         # grows on the CPU


def test_waves_are_sized_from_the_devices_memory_in_the_real_dtype(cfg, tokenizer, monkeypatch):
    model = make_tiny_model(tokenizer)
    fp32 = kvbatch.kv_bytes_per_row(model, 1000)
    text = model.config
    assert fp32 == 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 1000 * 4
    assert kvbatch.kv_bytes_per_row(model.to(torch.bfloat16), 1000) * 2 == fp32
    model.float()
    before = kvbatch.free_memory("cpu")
    ballast = torch.ones(50_000_000)             # 200 MB in use by now: what is free changes, the wave must not
    assert kvbatch.free_memory("cpu") == before > ballast.numel()
    monkeypatch.setattr(kvbatch, "free_memory", lambda device: 40 * fp32)
    assert kvbatch.wave_rows(model, {**cfg["rollout"], "wave_rows": 0, "max_context": 1000}) == 10
    assert kvbatch.wave_rows(model, {**cfg["rollout"], "wave_rows": 7}) == 7


def test_kvbatch_rollback_and_new_rows(tokenizer, stopping_model):
    """Rolling back generated tokens and adding a row mid-way decode exactly like fresh sequences."""
    eos = tokenizer.eos_token_id
    a = lm.encode(tokenizer, "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
    b = lm.encode(tokenizer, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    batch = kvbatch.KVBatch(stopping_model, tokenizer.pad_token_id)
    batch.add("a", a)
    out = batch.generate(5, {eos})
    batch.rollback("a", len(out["a"][0]))
    assert batch.ids("a") == a
    batch.add("b", b)
    out = batch.generate(5, {eos})
    fresh = kvbatch.KVBatch(stopping_model, tokenizer.pad_token_id)
    fresh.add("a", a)
    fresh.add("b", b)
    again = fresh.generate(5, {eos})
    for key in "ab":
        assert again[key][0] == out[key][0]
        torch.testing.assert_close(torch.tensor(again[key][1]), torch.tensor(out[key][1]))


def test_sampling_matches_the_distribution_and_the_nucleus():
    """Inverse-CDF sampling draws from softmax(logits / T); with top-p it keeps exactly the tokens
    transformers' TopPLogitsWarper keeps, and never samples a token outside them."""
    from transformers.generation.logits_process import TopPLogitsWarper
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    gen = kvbatch.device_generator(1, "cpu")
    draws = torch.cat([kvbatch.sample_next(logits.expand(4000, -1), 0.8, 1.0, gen)[0] for _ in range(5)])
    freq = torch.bincount(draws, minlength=12).float() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.8, -1), atol=0.01, rtol=0)
    kept = TopPLogitsWarper(0.7)(None, logits / 0.8).isfinite()[0]
    tokens, logprobs = kvbatch.sample_next(logits.expand(20000, -1), 0.8, 0.7, gen)
    assert set(tokens.tolist()) == set(kept.nonzero().squeeze(-1).tolist())
    expected = torch.log_softmax(logits[0] / 0.8, -1)[tokens]          # recorded at T, before the nucleus
    torch.testing.assert_close(logprobs, expected)


def test_dialogues_of_one_persona_share_their_prompts_prefill_and_play_the_same(cfg, tokenizer):
    """KVBatch computes a prefix the G rollouts of a persona share (its system prompt) once and copies its
    cache slots: the greedy dialogues are the very ones played without sharing, the log-probs agree to
    float rounding, and far fewer tokens are prefilled."""
    model = make_stopping_model(tokenizer)
    people = P.sample_many(["merchant_recruitment", "courier_recruitment"], 2, seed=0)
    batches = []

    def play(share):
        class Decoder(kvbatch.KVBatch):
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


def test_personas_of_one_bank_keep_their_own_shared_prompt(tokenizer, tiny_model):
    """Two personas of one bank share only their prompt's first tokens; each one's G rows share its whole
    prompt. A row joins the group it shares the longest prefix with, and only where that saves more than
    it costs, so each persona's rows keep their long shared prefix (the rule before cut both groups to the
    bank's common opening: 93 s of prefill for 48 evaluation calls, measured)."""
    opening = list(range(10, 50))                                    # 40 tokens every prompt of the bank starts with
    prompts = [opening + list(range(100 + 200 * p, 300 + 200 * p)) for p in range(2)]   # 240 tokens each
    batch = kvbatch.KVBatch(tiny_model, tokenizer.pad_token_id)
    for p, prompt in enumerate(prompts):
        for g in range(3):
            batch.add((p, g), prompt + [7 + g, 8 + g])               # the opening line differs within a group
    batch._prefill_shared(torch.device("cpu"))
    assert all(batch.n_cached[(p, g)] == 240 for p in range(2) for g in range(3))
    assert batch.prefill_tokens == 2 * 240


def test_folded_adapter_plays_the_branches_dialogues_and_leaves_the_base(cfg, tokenizer, monkeypatch):
    """Fast path (`rollout.fold_adapter`, `lm.folded`): the policy decoded with its adapter folded into the
    weights plays the LoRA branches' greedy dialogues (float32: the same tokens, log-probs within 1e-5;
    sampled ones part where a draw falls within rounding of a boundary), while the simulator speaking
    through the same model's adapter-off view still hears from the base between the policy's turns, and
    the base weights are the same tensors, bit for bit, afterwards."""
    model = lora_policy(tokenizer)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    folds = []
    monkeypatch.setattr(lm, "fold_adapter", lambda m, plain=lm.fold_adapter: folds.append(plain(m)) or folds[-1])
    ref = play(cfg, tokenizer, model, kvbatch.KVBatch)
    assert not folds                                                         # the plain path folds nothing
    out = play(cfg, tokenizer, model, functools.partial(kvbatch.KVBatch, fold=True))
    assert_same(ref, out, atol=1e-5)
    assert folds and all(len(f) == 2 * 2 for f in folds)                     # q_proj, v_proj x 2 layers: folded
    for n, p in model.named_parameters():
        assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]), n


def test_folded_adapter_follows_an_updated_adapter(tokenizer):
    """A KVBatch folds again when the adapter changed since its last fold (an optimizer step, a loaded
    adapter), and folds nothing with the adapter disabled or for the simulator's adapter-off view."""
    model = lora_policy(tokenizer)

    def greedy(fold):
        batch = kvbatch.KVBatch(model, tokenizer.pad_token_id, fold=fold)
        batch.add(0, [1, 2, 3, 4, 5])
        return batch, batch.generate(6, set())[0][0]

    batch, _ = greedy(True)
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if "lora_B" in n], lr=1.0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
    optimizer.step()
    stale = batch._folded
    batch.add(1, [1, 2, 3, 4, 5])
    batch.drop([0])
    assert batch.generate(6, set())[1][0] == greedy(False)[1]     # the stepped adapter, as the branches play it
    assert batch._folded is not stale
    with lm.adapter_off(model):
        assert lm.fold_adapter(model) is None
    assert not kvbatch.KVBatch(model, tokenizer.pad_token_id, adapter=False, fold=True).fold
