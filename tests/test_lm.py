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
