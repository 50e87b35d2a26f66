"""Issue 31 experiment (not used by training): how much of a LoRA adapter survives being merged into
bfloat16 weights?

Merging the policy's adapter for its decode turns would remove the LoRA branches (20% of a bf16 decode
step, docs/savpo.md). But a merge writes W0 + scale * B @ A back in the weights' dtype, and a bf16
weight keeps 8 significant bits: an update below half a unit in the last place of W0 rounds away.
For each adapter this prints the share of adapted weight entries the merge leaves unchanged and the
relative error of the merged update, |bf16(W0 + delta) - W0 - delta| / |delta| (0: exact, 1: lost).
W0 is the base the adapter was trained on: the warm-started model for a policy adapter (default), the
raw model for the warm start itself (--raw-base).

What decoding sees is the logits, so the same question is also asked there, on the first expert call
of data/logs/sales_logs.jsonl (chat template, at most 700 tokens; that call has 273): the adapter's
effect in float32, e = logits(W0 + adapter) - logits(W0), against what bf16 keeps of it, unmerged (the
training path, `lm.lora_in_base_dtype`) and merged: the projection <d, e> / <e, e> of each bf16 effect d
(1: all of it kept), and bf16's own rounding noise, mean |logits_bf16(W0) - logits_fp32(W0)|, beside mean |e|.
Prints a JSON line per adapter.

    python scripts/merge_rounding.py runs/NAME/checkpoints/step_000008/adapter
    python scripts/merge_rounding.py --raw-base data/warmstart/adapter
"""
import argparse
import copy
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config      # noqa: E402
import lm          # noqa: E402
import warmstart   # noqa: E402
from learn_to_ask.data import read_logs   # noqa: E402


def merge_error(model, adapter_dir, dtype=torch.bfloat16):
    """(share of entries unchanged, relative error of the merged update) over every adapted projection."""
    from safetensors.torch import load_file
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        adapter = json.load(f)
    scale = adapter["lora_alpha"] / adapter["r"]
    state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    unchanged = entries = delta_sq = error_sq = 0.0
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        b = state[key.replace(".lora_A.", ".lora_B.")]
        w0 = model.get_submodule(key.removeprefix("base_model.model.").split(".lora_A.")[0]).weight.detach().float()
        delta = scale * (b.float() @ a.float())
        merged = (w0 + delta).to(dtype).float()
        unchanged += (merged == w0.to(dtype).float()).sum().item()
        entries += w0.numel()
        delta_sq += delta.square().sum().item()
        error_sq += (merged - w0 - delta).square().sum().item()
    return unchanged / entries, (error_sq / delta_sq) ** 0.5


def logits_kept(base32, base16, adapter_dir, ids):
    """The adapter's float32 logit effect and the share of it bf16 keeps, unmerged and merged (module doc)."""
    def logits(model):
        with torch.no_grad():
            return model(ids).logits[0].float()

    def kept(effect16, effect):
        return round(float((effect16 * effect).sum() / effect.square().sum()), 3)

    plain32, plain16 = logits(base32), logits(base16)
    effect = logits(lm.load_adapter(base32, adapter_dir)) - plain32
    adapted16 = lm.lora_in_base_dtype(lm.load_adapter(base16, adapter_dir))
    unmerged = logits(adapted16) - plain16
    merged = logits(adapted16.merge_and_unload()) - plain16
    return {"effect_mean_abs": round(float(effect.abs().mean()), 4),
            "bf16_noise_mean_abs": round(float((plain16 - plain32).abs().mean()), 4),
            "kept_unmerged_bf16": kept(unmerged, effect), "kept_merged_bf16": kept(merged, effect)}


def expert_call_ids(tokenizer, n_tokens=700):
    sessions, _ = read_logs(os.path.join(ROOT, "data", "logs", "sales_logs.jsonl"), on_bad_line="refuse")
    messages = sessions[0]["messages"]
    return torch.tensor([tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"][:n_tokens]])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", nargs="+", help="LoRA adapter folders (adapter_config.json + safetensors)")
    parser.add_argument("--raw-base", action="store_true", help="measure against the model without its warm start")
    args = parser.parse_args()
    for path in args.adapters:     # before the model loads
        if not all(os.path.isfile(os.path.join(path, f)) for f in ("adapter_config.json", "adapter_model.safetensors")):
            raise SystemExit(f"merge_rounding: {path} is not a LoRA adapter folder (it needs adapter_config.json and "
                             f"adapter_model.safetensors); give a checkpoint's, e.g. runs/NAME/checkpoints/step_000008/adapter.")
    overrides = ["model.dtype=bfloat16"] + (["model.warm_start="] if args.raw_base else [])
    cfg = config.load(None, overrides)
    model_cfg = (cfg if args.raw_base else warmstart.resolve(cfg))["model"]
    tokenizer, model = lm.load_model(model_cfg)
    model32 = lm.load_model({**model_cfg, "dtype": "float32"})[1]
    ids = expert_call_ids(tokenizer)
    for path in args.adapters:
        unchanged, error = merge_error(model, path)
        row = {"adapter": path, "entries_unchanged": round(unchanged, 3), "relative_error": round(error, 3)}
        # copies: loading and merging an adapter changes the model it is loaded on
        row.update(logits_kept(copy.deepcopy(model32), copy.deepcopy(model), path, ids))
        print(json.dumps(row))


if __name__ == "__main__":
    main()
