"""Evaluation of a policy against the Cognitive User Simulator on held-out personas.

    python eval.py                                   # the base model
    python eval.py --adapter runs/default/checkpoints/step_000010/adapter
"""

import torch

import rollout
import savpo
import simulator as S


@torch.no_grad()
def quick(model, tokenizer, cfg, persona_list, seed=0, group_size=1):
    """Success rate and state metrics of `group_size` rollouts per persona (savpo's periodic eval)."""
    was_training = model.training
    model.eval()
    sim = S.CognitiveUserSimulator(cfg["simulator"], model, tokenizer, seed=seed + 1)
    trajs = rollout.run(model, tokenizer, sim, persona_list, cfg["rollout"], group_size=group_size,
                        seed=seed + 7)
    model.train(was_training)
    return savpo.summarize(trajs)


def plot_curves(run_dir):
    """curves.png next to a run's metrics.jsonl: loss terms and rollout outcomes per step."""
    import json
    import os
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for key in ("aopsd_kl", "pg_loss", "loss"):
        axes[0].plot(steps, [r[key] for r in rows], marker="o", label=key)
    axes[0].set_title("losses")
    for key in ("success_rate", "reveal_rate", "resolve_rate"):
        axes[1].plot(steps, [r[key] for r in rows], marker="o", label=key)
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].set_title("training rollouts")
    axes[2].plot(steps, [r["willingness_gain"] for r in rows], marker="o", color="tab:green")
    axes[2].axhline(0, color="gray", lw=0.5)
    axes[2].set_title("willingness gain per dialogue")
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(run_dir, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
