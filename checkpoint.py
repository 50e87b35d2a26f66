"""Checkpoints of a training run, shared by savpo.py and learn_to_ask.py: written whole, then published;
read back with a damaged one set aside.

Layout: OUT/checkpoints/step_NNNNNN/{adapter/, trainer.pt} plus OUT/checkpoints/latest, a file holding
the name of the newest. `adapter/` is a PEFT folder (`PeftModel.from_pretrained` loads it; an EMA
teacher adapter sits in `adapter/ema/`); `trainer.pt` holds whatever the trainer needs to continue
(optimizer, scheduler, RNG states, step).

Writing: into step_N.tmp, renamed to step_N, then `latest` is rewritten by an atomic rename; the newest
two checkpoints are kept. A kill at any moment leaves the previous checkpoint usable.

Reading (`load`): the checkpoint `latest` names. If a file of it cannot be read -- a disk that filled
up, a copy cut short -- the run says which file in one sentence, renames the folder to
step_N.damaged (kept for a look, never read again) and resumes from the newest complete checkpoint
before it, which the "keep two" rule provides. A `latest` that names a missing folder, or holds no
step name, is said in one sentence too and the newest complete folder before it is used. With no
complete checkpoint left, `resume` starts the run again from step 0, which its seed reproduces; it
refuses only a folder that holds no run at all (a mistyped out_dir). Resuming from an older
checkpoint is exact: the steps after it are trained again, and the logs are cut back to it
(`truncate_jsonl`; a last line cut off by a kill is dropped with a sentence).
"""

import os
import re
import shutil

import torch

import runfiles

STEP_DIR = re.compile(r"^step_\d{6}$")


class CheckpointError(RuntimeError):
    """No usable checkpoint to resume from; the message says why and what to do."""


def write(root, step, model, trainer_state):
    """Write root/step_N/{adapter/, trainer.pt} completely, then point root/latest at it with an atomic
    rename: a kill at any moment leaves the previous checkpoint usable. Keeps the last two."""
    name = f"step_{step:06d}"
    tmp, final = os.path.join(root, name + ".tmp"), os.path.join(root, name)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(os.path.join(tmp, "adapter"))
    torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    runfiles.write_text(os.path.join(root, "latest"), name)
    for old in sorted(d for d in os.listdir(root) if STEP_DIR.match(d) and d != name)[:-1]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def _read(path):
    """(trainer state, {adapter name: weights}) of one checkpoint folder; raises OSError naming the first
    file that cannot be read, as 'PATH (why)'."""
    from peft.utils import load_peft_weights
    adapters = {}
    adapter_dir = os.path.join(path, "adapter")
    if not os.path.isdir(adapter_dir):
        raise OSError(f"{adapter_dir} (missing)")
    for name, folder in [("default", adapter_dir)] + [
            (d, os.path.join(adapter_dir, d)) for d in sorted(os.listdir(adapter_dir))
            if os.path.isdir(os.path.join(adapter_dir, d))]:      # extra adapters (ema) in sub-folders
        try:
            adapters[name] = load_peft_weights(folder)
        except Exception as e:
            raise OSError(f"{folder}/adapter_model.safetensors ({type(e).__name__})") from None
    file = os.path.join(path, "trainer.pt")
    try:
        state = torch.load(file, weights_only=False)
    except Exception as e:
        raise OSError(f"{file} ({type(e).__name__}: {' '.join(str(e).split())[:80]})") from None
    if not (isinstance(state, dict) and "step" in state):
        raise OSError(f"{file} (not a trainer state)")
    return state, adapters


def _named_by_latest(root, names, log):
    """The step folder `latest` names, or None (said in one sentence) when it names none or a missing one."""
    latest = os.path.join(root, "latest")
    if not os.path.exists(latest):
        return None
    try:
        with open(latest, encoding="utf-8") as f:
            named = f.read().strip()
    except (OSError, UnicodeDecodeError):
        named = ""
    older = [d for d in names if not STEP_DIR.match(named) or d < named]
    then = f"{older[0]}, the newest complete checkpoint before it" if older else "step 0"
    if not STEP_DIR.match(named):
        log(f"{latest} names no checkpoint ({named[:40]!r}); the run resumes from "
            f"{older[0] + ', the newest checkpoint folder' if older else 'step 0'}.")
        return None
    if named not in names:
        log(f"{latest} names {named}, which does not exist; the run resumes from {then}.")
    return named


def load(root, model, log=print):
    """Load the newest complete checkpoint under `root` into `model`'s adapters and return (its folder,
    the trainer state saved with it), or (None, None) if there is none: a damaged checkpoint is reported,
    renamed to step_N.damaged and skipped for the one before it. Raises CheckpointError if a checkpoint
    does not fit `model` (another LoRA shape or base model)."""
    from peft import set_peft_model_state_dict
    names = sorted((d for d in os.listdir(root) if STEP_DIR.match(d) and os.path.isdir(os.path.join(root, d))),
                   reverse=True) if os.path.isdir(root) else []
    named = _named_by_latest(root, names, log)
    candidates = [d for d in names if named is None or d <= named]
    for k, name in enumerate(candidates):
        path = os.path.join(root, name)
        try:
            state, adapters = _read(path)
        except OSError as damaged:
            fallback = f"{candidates[k + 1]}, the newest complete checkpoint before it" if k + 1 < len(candidates) \
                else "step 0 (no complete checkpoint precedes it; the seed gives the same start)"
            shutil.rmtree(path + ".damaged", ignore_errors=True)
            os.replace(path, path + ".damaged")
            log(f"checkpoint file {damaged} is damaged; it was moved to {name}.damaged and the run resumes from "
                f"{fallback}.")
            continue
        try:
            for adapter_name, weights in adapters.items():
                set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model ({' '.join(str(e).split())[:120]}); "
                                  f"resume with the run's own model and lora settings (drop those overrides).") from None
        runfiles.write_text(os.path.join(root, "latest"), name)    # `latest` names what was actually resumed from
        return path, state
    return None, None


def resume(run_dir, model, logs=("metrics.jsonl",), log=print):
    """Continue the run in `run_dir`: its newest complete checkpoint loaded into `model` (`load`) and its
    step logs cut back to that step. With no usable checkpoint the run starts again from step 0 (its logs
    cut back to nothing: the seed gives the same start, so they are written again the same); a folder
    that holds no run at all (no checkpoints/, no logs) is refused. Returns (checkpoint folder or None,
    trainer state or None)."""
    root = os.path.join(run_dir, "checkpoints")
    traces = [p for p in [root, *(os.path.join(run_dir, n) for n in logs)] if os.path.exists(p)]
    if not traces:
        raise CheckpointError(f"--resume: nothing to resume in {run_dir} (no checkpoints/, no {' or '.join(logs)}); "
                              f"start without --resume, or set the out_dir of the run to continue.")
    path, state = load(root, model, log)
    step = state["step"] if state else 0
    if state is None:
        log(f"{root}: no complete checkpoint; the run starts again from step 0.")
    for name in logs:
        truncate_jsonl(os.path.join(run_dir, name), step, log)
    return path, state


def truncate_jsonl(path, step, log=print):
    """Keep the lines of a step log whose "step" is <= `step` (written whole, then renamed); no file, no-op.
    A last line cut off by a kill or a full disk is dropped with a sentence (it belongs to a step after the
    checkpoint: a step's lines are written before its checkpoint); any other unreadable line stops with a
    CheckpointError naming FILE:LINE."""
    if not os.path.exists(path):
        return
    lines = runfiles.jsonl_lines(path)
    if runfiles.cut_off(lines):
        log(f"{path}: its last line (line {lines[-1].number}) was cut off by a kill or a full disk while it was "
            f"written; it is dropped, and that step is logged again.")
        lines = lines[:-1]
    for line in lines:
        if line.problem or not isinstance(line.record, dict) or not isinstance(line.record.get("step", 0), int):
            raise CheckpointError(f"{path}:{line.number} is {line.problem or 'not a step record'}; delete or fix that "
                                  f"line, then --resume again.")
    keep = [line.raw if line.raw.endswith(b"\n") else line.raw + b"\n" for line in lines
            if line.record.get("step", 0) <= step]
    with runfiles.atomic(path, "wb") as f:
        f.writelines(keep)
