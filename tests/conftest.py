"""Shared fixtures: the real tokenizer (from the embedded model's cache), a tiny random Llama built
from a config for unit tests, and the real SmolLM2-135M for the few integration tests."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

import config  # noqa: E402
import lm  # noqa: E402
import personas as P  # noqa: E402

torch.set_num_threads(2)

# `model.dtype: auto` is float32 in the tests on every machine: they compare numbers across code paths, and
# CI's CPU may or may not have native bf16 (lm.cpu_has_native_bf16). The bf16 path is tested by name.
lm.cpu_has_native_bf16 = lambda: False

# property-based tests are seeded like the rest: the same examples on every run, nothing stored between runs
from hypothesis import settings as hypothesis_settings  # noqa: E402

hypothesis_settings.register_profile("project", derandomize=True, database=None, deadline=None)
hypothesis_settings.load_profile("project")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer
    lm.quiet_transformers()
    tok = AutoTokenizer.from_pretrained(lm.embedded_path())
    return tok


def make_tiny_model(tokenizer, seed=0, layers=2):
    """A random 2-layer Llama over the real vocabulary: same code paths as the real model, ~3M params."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      tie_word_embeddings=True, initializer_range=0.3)  # lively: varied tokens, no ties
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def make_tiny_arch(tokenizer, arch, seed=0):
    """A random 2-layer model of another architecture over the real vocabulary, with that class's own
    output head: Granite divides its logits by `logits_scaling`, Gemma-2 soft-caps them."""
    from transformers import AutoConfig, AutoModelForCausalLM
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, initializer_range=0.3)
    extra = {"llama": {}, "qwen2": {},
             "granite": dict(logits_scaling=0.25, embedding_multiplier=2.0, residual_multiplier=0.5),
             "gemma2": dict(head_dim=8, final_logit_softcapping=2.0, attn_logit_softcapping=5.0,
                            query_pre_attn_scalar=8, sliding_window=4096)}[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **common, **extra))
    model.eval()
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A saved tiny random Llama (with the real tokenizer): what `model.name_or_path` points the trainer at."""
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_cfg(tiny_dir, out, *extra):
    """A two-step run on the tiny model: 2 personas x G = 2, 6 tokens a turn, 2 turns, bank lines and the
    lexical appraiser (no encoder to load), a checkpoint every step."""
    return config.load(None, [f"model.name_or_path={tiny_dir}", f"out_dir={out}", "train.steps=2",
                              "train.personas_per_step=2", "train.group_size=2", "train.micro_batch=2", "train.minibatches=1",
                              "rollout.max_new_tokens=6", "simulator.max_turns=2", "simulator.utterance=template",
                              "simulator.appraiser=lexical", "personas.eval_n=2", "train.save_every=1",
                              "train.lr=1e-2", "aopsd.placement=system", "model.warm_start=",
                              "personas.curriculum_steps=0", "personas.eval_samples=1", *extra])


@pytest.fixture
def one_thread():
    """torch on one thread for the test: a tiny model's ops are so small that a second thread only adds
    synchronisation, which costs most when the cores are shared (measured: a 3-step tiny run, 4.4 s of CPU on
    one thread, 26 s on two with other jobs running)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)


@pytest.fixture(scope="session")
def real_model():
    """The embedded 135M model as published (not the shipped warm start config.yaml starts runs from)."""
    cfg = config.load()
    return lm.load_model({**cfg["model"], "warm_start": ""})


@pytest.fixture
def cfg():
    return config.load()


@pytest.fixture
def rules(cfg):
    """The simulator's transition-rule numbers of the default config."""
    return cfg["simulator"]["rules"]


def persona_with(concern_ids, willingness=1.0, domain="merchant_recruitment", severity=2):
    """A persona of `domain` holding exactly the bank's `concern_ids` (severity and willingness given)."""
    bank = P.load_bank(domain)
    by_id = {c["id"]: c for c in bank["concerns"]}
    concerns = [P.Concern(**{**{k: by_id[i][k] for k in P._CONCERN_FIELDS if k != "severity"}, "severity": severity})
                for i in concern_ids]
    return P.Persona(persona_id="test", domain=domain, name="Maria Rossi", traits={"business_type": "pizzeria"},
                     style="terse", willingness=willingness, concerns=concerns, stratum="test")


def input_ids_of_logits(args, kwargs):
    """The input token at each position whose logits a forward returned (all, the last k, or the
    positions of a `logits_to_keep` tensor, as KVBatch's prefill asks)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    keep = kwargs.get("logits_to_keep", 0)
    if isinstance(keep, torch.Tensor):
        return ids[:, keep]
    return ids[:, -keep:] if keep else ids


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


@pytest.fixture
def stopping_model(tokenizer):
    return make_stopping_model(tokenizer)
