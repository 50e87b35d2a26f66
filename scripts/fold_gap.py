"""Issue 31 experiment (not used by training): what folding the adapter into bf16 weights for the policy's
turns (`rollout.fold_adapter`, `lm.folded`) costs in fidelity, and what it saves in time.

For one trained adapter, one training step's rollouts (the config's first step: 4 personas x G 8 from
the shipped warm start) are decoded twice, folded and with the LoRA branches, each in its own Trainer.
For every sampled token it compares the log-prob the rollout recorded with the trainer's forward of the
same tokens (what the PPO ratio takes as the behaviour policy; the gap `logprob_gap_mean` of
metrics.jsonl), and with the same adapter over float32 weights (the policy the adapter describes).
Sampled calls differ between the two ways, so each gap is over its own calls. Prints a JSON line per way.

    python scripts/fold_gap.py runs/NAME/checkpoints/step_000004/adapter
"""
import argparse
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config      # noqa: E402
import lm          # noqa: E402
import savpo       # noqa: E402
import warmstart   # noqa: E402


def trainer(adapter, out, *overrides):
    cfg = warmstart.resolve(config.load(None, [f"out_dir={out}", *overrides]))
    tr = savpo.Trainer(cfg, log=lambda *a: None)
    lm.load_adapter(tr.model, adapter, name="default")
    return tr


@torch.no_grad()
def gaps(tr, trajs):
    """(trainer forward - recorded rollout) log-prob of every sampled token, one persona group at a time."""
    out = []
    for g in sorted({t.group for t in trajs}):
        batch = [t for t in trajs if t.group == g]
        targets = [savpo.agent_targets(t) for t in batch]
        _, logp = tr._agent_logprobs(batch, targets)
        out.append(logp - torch.tensor([x for tg in targets for x in tg.logprobs]))
    return torch.cat(out)


def summary(gap):
    return {"mean_abs": round(float(gap.abs().mean()), 4), "max_abs": round(float(gap.abs().max()), 3),
            "mean": round(float(gap.mean()), 4), "tokens": gap.numel()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("adapter", help="a trained adapter folder (checkpoints/step_N/adapter)")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for fold in (True, False):
            tr = trainer(args.adapter, out, f"rollout.fold_adapter={str(fold).lower()}")
            trajs, seconds, _ = tr.collect(0)
            rows[fold] = {"fold_adapter": fold, "rollout_s": round(seconds, 1), "calls": len(trajs),
                          "gap_bf16_forward": summary(gaps(tr, trajs)), "trajs": trajs}
            del tr
        reference = trainer(args.adapter, out, "model.dtype=float32")
        for row in rows.values():
            row["gap_float32_policy"] = summary(gaps(reference, row.pop("trajs")))
            print(json.dumps({"adapter": args.adapter, **row}))


if __name__ == "__main__":
    main()
