"""Integration tests on the real embedded SmolLM2-135M (loaded once per session)."""
import time

import pytest
import torch

import lm


def test_embedded_model_loads_offline_and_chats(real_model):
    tokenizer, model = real_model
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    assert lm.count_base_parameters(model) == pytest.approx(134.5e6, rel=0.01)


def test_unavailable_hub_id_fails_fast_and_names_the_default():
    t0 = time.perf_counter()
    with pytest.raises(lm.ModelError) as err:
        lm.resolve("some-org/not-a-cached-model")
    assert time.perf_counter() - t0 < 10
    assert lm.EMBEDDED in str(err.value) and "cannot download" in str(err.value)
    with pytest.raises(lm.ModelError, match="does not exist"):
        lm.resolve("./no/such/folder")


def test_message_pieces_rebuild_the_chat_template(tokenizer):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello"}]
    ids = []
    for m in msgs:
        ids += lm.flat_message_ids(tokenizer, m["role"], m["content"])
    reference = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert tokenizer.decode(ids) == reference
    eos, rest = lm.end_of_turn_ids(tokenizer)
    assert eos == tokenizer.eos_token_id and tokenizer.decode(rest) == "\n"


def test_lora_adapter_off_is_the_base(tiny_model, cfg):
    x = torch.randint(0, 1000, (1, 8))
    base = tiny_model(x).logits
    n_base = lm.count_base_parameters(tiny_model)
    model = lm.add_lora(tiny_model, cfg["lora"])
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter
    assert not torch.allclose(model(x).logits, base)
    with lm.adapter_off(model):
        assert torch.allclose(model(x).logits, base)
    assert lm.count_base_parameters(model) == n_base     # the adapter adds LoRA matrices, not a model


def test_auto_dtype_is_bfloat16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    """`model.dtype: auto`: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX), float32 on other
    CPUs, where bf16 is emulated and slower; a dtype named explicitly is used as given."""
    monkeypatch.setattr(lm, "cpu_has_native_bf16", lambda: True)
    assert lm.pick_dtype("auto", "cpu") == torch.bfloat16 and lm.pick_dtype("float32", "cpu") == torch.float32
    monkeypatch.setattr(lm, "cpu_has_native_bf16", lambda: False)
    assert lm.pick_dtype("auto", "cpu") == torch.float32 and lm.pick_dtype("bfloat16", "cpu") == torch.bfloat16
    assert lm.pick_dtype("auto", "cuda") == torch.bfloat16


def _bf16_pair(tokenizer):
    """The same tiny bf16 base and trained-looking adapter, on the fast path and on the plain one."""
    from conftest import make_tiny_model
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}
    fast = lm.add_lora(make_tiny_model(tokenizer).to(torch.bfloat16), lora)
    plain = lm.add_lora(make_tiny_model(tokenizer).to(torch.bfloat16), lora, lora_autocast=False)
    torch.manual_seed(1)
    for (n, p), (_, q) in zip(fast.named_parameters(), plain.named_parameters()):
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
        q.data.copy_(p.data)
    return fast, plain


def test_lora_in_base_dtype_matches_the_plain_path(tokenizer):
    """The fast path (adapter branches under autocast in the base's bf16) against PEFT's casts: with the
    adapter off or zero the logits are bit for bit the same, with it on they agree to bf16 rounding,
    and so do the float32 adapter's gradients."""
    fast, plain = _bf16_pair(tokenizer)
    assert fast.get_base_model()._lora_autocast and not getattr(plain.get_base_model(), "_lora_autocast", False)
    lora_dtypes = {p.dtype for n, p in fast.named_parameters() if "lora_" in n}
    assert lora_dtypes == {torch.float32}                      # the optimizer still steps float32 weights
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with lm.adapter_off(fast), lm.adapter_off(plain):
        assert torch.equal(fast(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
    with lm.start_policy(fast), lm.start_policy(plain):           # a zero adapter added later: the same flag
        assert torch.equal(fast(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
    with lm.adapter_off(plain):
        base = plain(ids, attention_mask=mask).logits.float()
    fast.train(), plain.train()
    out = {}
    for name, model in (("fast", fast), ("plain", plain)):
        logits = model(ids, attention_mask=mask).logits
        assert logits.dtype == torch.bfloat16
        loss = lm.token_logprobs(logits[:, :-1], ids[:, 1:]).mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n])
        assert grads.dtype == torch.float32 and grads.abs().sum() > 0
        out[name] = (logits.float().detach(), grads)
    (lf, gf), (lp, gp) = out["fast"], out["plain"]
    moved = (lp - base).abs().mean()
    assert moved > 0.05                                        # the adapter matters ...
    assert (lf - lp).abs().mean() < 0.1 * moved                # ... and both paths apply the same one
    assert torch.nn.functional.cosine_similarity(gf, gp, dim=0) > 0.99
    assert (gf.norm() / gp.norm() - 1).abs() < 0.05


def test_lora_in_base_dtype_below_the_wrapped_forward_is_the_plain_path(tokenizer):
    """A caller that runs the decoder itself (TRL does), outside the autocast of the base's forward, gets
    PEFT's casts back layer by layer: no dtype mismatch, and the plain path's logits bit for bit."""
    fast, plain = _bf16_pair(tokenizer)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        below = [m.get_base_model().lm_head(m.get_base_model().model(ids).last_hidden_state) for m in (fast, plain)]
        wrapped = fast(ids).logits
    assert torch.equal(below[0], below[1])
    assert not torch.equal(below[0], wrapped)      # the wrapped forward really took the autocast path


def test_lora_in_base_dtype_leaves_float32_and_the_plain_path_alone(tokenizer, tiny_model, cfg):
    model = lm.add_lora(tiny_model, cfg["lora"])                # a float32 base: nothing to speed up
    assert not getattr(model.get_base_model(), "_lora_autocast", False)
    _, plain = _bf16_pair(tokenizer)
    from peft.tuners.tuners_utils import BaseTunerLayer
    assert all(m.cast_input_dtype_enabled and "_cast_input_dtype" not in vars(m)
               for m in plain.modules() if isinstance(m, BaseTunerLayer))


def test_merge_rounding_measures_what_a_bf16_merge_keeps(tokenizer, tmp_path):
    """scripts/merge_rounding.py: an update far above a bf16 weight's last place survives the merge (error
    near 0), one far below it rounds away (error near 1, entries unchanged)."""
    import importlib.util
    from conftest import make_tiny_model
    spec = importlib.util.spec_from_file_location("merge_rounding", "scripts/merge_rounding.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "up_proj"]}
    base = make_tiny_model(tokenizer).to(torch.bfloat16)
    for std, folder in ((1.0, "big"), (1e-6, "small")):
        model = lm.add_lora(make_tiny_model(tokenizer), lora)
        torch.manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_" in n:
                torch.nn.init.normal_(p, std=std ** 0.5)
        model.save_pretrained(tmp_path / folder)
    unchanged, error = script.merge_error(base, str(tmp_path / "big"))
    assert unchanged < 0.05 and error < 0.01
    unchanged, error = script.merge_error(base, str(tmp_path / "small"))
    assert unchanged > 0.95 and error > 0.95
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    fresh = lambda: (make_tiny_model(tokenizer), make_tiny_model(tokenizer).to(torch.bfloat16))
    big = script.logits_kept(*fresh(), str(tmp_path / "big"), ids)
    assert big["effect_mean_abs"] > 10 * big["bf16_noise_mean_abs"]
    assert abs(big["kept_unmerged_bf16"] - 1) < 0.1 and abs(big["kept_merged_bf16"] - 1) < 0.1
    small = script.logits_kept(*fresh(), str(tmp_path / "small"), ids)
    assert small["kept_merged_bf16"] < 0.5        # the merge rounded the update away
