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
