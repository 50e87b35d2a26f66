"""The static-shape decode engine (rollout.StaticKVBatch, `rollout.compile`): the same dialogues as the
eager KVBatch -- compiled or not, for the adapter-on policy and the adapter-off simulator view, across
row buckets, calls leaving the batch and rollbacks -- a bounded number of compilations, and memory-sized
waves in the model's real dtype."""
import functools

import pytest
import torch

import lm
import personas as P
import rollout
import simulator as S
from conftest import make_tiny_model
from test_rollout import make_stopping_model


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
    sizes = [rollout.row_bucket(n) for n in range(1, 200)]
    assert sizes[:9] == [1, 2, 3, 4, 6, 6, 8, 8, 12]
    assert all(b >= n and (b - n) / b < 1 / 3 for n, b in enumerate(sizes, 1))
    assert sizes == sorted(sizes) and len(set(sizes)) <= 2 * 8 + 1      # O(log n) shapes up to 199 rows


def test_static_layout_plays_the_eager_engines_dialogues(cfg, tokenizer):
    """The fixed-capacity cache, uncompiled: the eager engine's greedy and sampled dialogues exactly,
    with rows bucketed, calls leaving, turns cut at the callee's part (rollbacks) and the cache growing
    past a block."""
    model = lora_policy(tokenizer)
    static = functools.partial(rollout.StaticKVBatch, compile=False)
    for temperature in (0.0, 0.7):
        ref = play(cfg, tokenizer, model, rollout.KVBatch, temperature)
        out = play(cfg, tokenizer, model, static, temperature)
        assert_same(ref, out)
    assert len({t.decision for t in ref}) > 1 or len({len(t.ids) for t in ref}) > 1    # calls end apart
    assert max(len(t.ids) for t in ref) > rollout.StaticKVBatch.BLOCK                 # capacity grew


def test_static_batch_buckets_shrink_and_rollback(tokenizer):
    """Rows leave: the buffers shrink to the next bucket only when the live rows fit it; a rollback hides
    the forgotten slots; a new row joins an existing static batch."""
    model = make_tiny_model(tokenizer)
    batch = rollout.StaticKVBatch(model, tokenizer.pad_token_id, compile=False)
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

    eager = rollout.KVBatch(model, tokenizer.pad_token_id)
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
    rollout._STEPS.clear()
    model = lora_policy(tokenizer)
    ref = play(cfg, tokenizer, model, rollout.KVBatch)
    shapes = set()
    original = rollout.StaticKVBatch._step

    def spy(self, step_ids, active):
        shapes.add((tuple(self.mask.shape), self.adapter))
        return original(self, step_ids, active)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rollout.StaticKVBatch, "_step", spy)
        out = play(cfg, tokenizer, model, rollout.StaticKVBatch)
        graphs = counters["stats"]["unique_graphs"]
        again = play(cfg, tokenizer, model, rollout.StaticKVBatch)
    assert_same(ref, out)
    assert_same(out, again, atol=0)
    assert {adapter for _, adapter in shapes} == {True, False}
    assert 2 <= graphs <= len(shapes)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_setting_picks_the_engine(cfg, tokenizer):
    model = make_tiny_model(tokenizer)
    roll = cfg["rollout"]
    assert rollout.decoder_for(model, {**roll, "compile": "off"}) is rollout.KVBatch
    assert rollout.decoder_for(model, {**roll, "compile": "auto"}) is rollout.KVBatch    # the CPU: eager
    on = rollout.decoder_for(model, {**roll, "compile": "on"})
    assert on.func is rollout.StaticKVBatch and on.keywords["capacity"] is None         # grows on the CPU


def test_waves_are_sized_from_the_devices_memory_in_the_real_dtype(cfg, tokenizer, monkeypatch):
    model = make_tiny_model(tokenizer)
    fp32 = rollout.kv_bytes_per_row(model, 1000)
    text = model.config
    assert fp32 == 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 1000 * 4
    assert rollout.kv_bytes_per_row(model.to(torch.bfloat16), 1000) * 2 == fp32
    model.float()
    before = rollout.free_memory("cpu")
    ballast = torch.ones(50_000_000)             # 200 MB in use by now: what is free changes, the wave must not
    assert rollout.free_memory("cpu") == before > ballast.numel()
    monkeypatch.setattr(rollout, "free_memory", lambda device: 40 * fp32)
    assert rollout.wave_rows(model, {**cfg["rollout"], "wave_rows": 0, "max_context": 1000}) == 10
    assert rollout.wave_rows(model, {**cfg["rollout"], "wave_rows": 7}) == 7


def test_the_gpu_check_runs_every_step_and_writes_one_json(tmp_path):
    """`bash scripts/gpu_check.sh --smoke`: the GPU command's steps (both benches with the compiled
    engine, a random model written, savpo.py on it) at toy sizes on the CPU, gathered into one JSON."""
    import json
    import os
    import subprocess
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path / "check"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke"], capture_output=True, text=True, env=env,
                          timeout=900)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.load(open(tmp_path / "check" / "gpu_check.json")) == report
    assert {k: report[k]["rc"] for k in ("bench_a", "bench_b", "write_model", "savpo")} == dict.fromkeys(
        ("bench_a", "bench_b", "write_model", "savpo"), 0), done.stderr[-2000:]
    bench = report["bench_a"]["result"]
    assert bench["identical_dialogues"] is True and bench["kv_compiled_tok_s"] > 0
    assert report["savpo"]["steps"][0]["step_s"] > 0 and report["savpo"]["steps"][0]["peak_mem_gb"] > 0
