"""Learn-to-Ask ("Grounded in Reality", arXiv 2510.25441): learn when to ask what, and when to stop, from
offline expert logs, with no simulator in the loop. The project's second method, in its own folder.

    python -m learn_to_ask make-logs|prepare|calibrate|train|eval|play    (see policy.py)

  data.py    logs -> single-step samples: each log cut after every customer turn, `decision_truth` and
             `info_truth` from the observed future
  reward.py  the reply format, the published reward R = R_s (1 + beta R_a) + P, the graders
  policy.py  the policy's prompt, sampling, GRPO, evaluation, the online check against the simulator
  config.yaml  its knobs (`learn_to_ask.*`); the shared ones (model, lora, seed) are ../config.yaml's
"""

import os

import config

CHOICES = {
    "learn_to_ask.on_bad_line": ["skip", "refuse"],
    "learn_to_ask.extractor": ["labels", "llm"],
    "learn_to_ask.reward": ["default", "sum", "Ra", "Rs"],
    "learn_to_ask.reward_parse": ["published", "strict"],
    "learn_to_ask.grader": ["proxy", "llm"],
    "learn_to_ask.grader_prompt": ["best", "rubric", "rubric+cal", "fewshot", "fewshot+cal", "short", "short+cal"],
}
RANGES = {
    "learn_to_ask.extractor_max_tokens": ">= 1", "learn_to_ask.test_fraction": "[0, 1)",
    "learn_to_ask.max_sessions": ">= 0", "learn_to_ask.log_sessions": ">= 1", "learn_to_ask.beta": ">= 0",
    "learn_to_ask.max_new_tokens": ">= 1", "learn_to_ask.temperature": ">= 0", "learn_to_ask.steps": ">= 1",
    "learn_to_ask.samples_per_step": ">= 1", "learn_to_ask.group_size": ">= 2", "learn_to_ask.epochs": ">= 1",
    "learn_to_ask.micro_batch": ">= 1", "learn_to_ask.lr": "> 0", "learn_to_ask.eps_low": "[0, 1)",
    "learn_to_ask.eps_high": ">= 0", "learn_to_ask.grad_clip": "> 0", "learn_to_ask.save_every": ">= 0",
    "learn_to_ask.n_eval_samples": ">= 1", "learn_to_ask.eval_rollouts": ">= 1", "learn_to_ask.play_n": ">= 1",
    "learn_to_ask.play_turns": ">= 1", "learn_to_ask.stop_fraction": "[0, 1]",
}
SECTION = config.Section(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.yaml"), CHOICES, RANGES)


def load_config(path=None, overrides=()):
    """The project's config.yaml plus Learn-to-Ask's own keys, then the user's file and overrides. The shipped
    warm start (config.yaml's model.warm_start) is SAVPO's, learnt on the simulator's expert calls: Learn-to-Ask
    starts from the model as published unless an override names one."""
    cfg = config.load(path, overrides, section=SECTION)
    if not any(str(o).startswith("model.warm_start=") for o in overrides):
        cfg["model"]["warm_start"] = ""
    return cfg
