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
before it, which the "keep two" rule provides; with none left it refuses. Resuming from the older
checkpoint is exact: the steps after it are trained again, and the logs are cut back to it
(`truncate_jsonl`).
"""

import json
import os
import re
import shutil

import torch

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
    with open(os.path.join(root, "latest.tmp"), "w") as f:
        f.write(name)
    os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    for old in sorted(d for d in os.listdir(root) if STEP_DIR.match(d) and d != name)[:-1]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def _read(path):
    """(trainer state, {adapter name: weights}) of one checkpoint folder; raises on any unreadable file
    with the file's path in the message."""
    from peft.utils import load_peft_weights
    adapters = {}
    adapter_dir = os.path.join(path, "adapter")
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
        raise OSError(f"{file} ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
    return state, adapters


def load(root, model, log=print):
    """Load the newest complete checkpoint under `root` into `model`'s adapters and return (its folder,
    the trainer state saved with it). A damaged newest checkpoint is reported, renamed to
    step_N.damaged and skipped for the one before it; raises CheckpointError if there is none."""
    from peft import set_peft_model_state_dict
    latest = os.path.join(root, "latest")
    if not os.path.exists(latest):
        raise CheckpointError(f"--resume: no checkpoint in {root}; start without --resume or set out_dir "
                              f"to the run to continue.")
    newest = open(latest).read().strip()
    candidates = [newest] + sorted((d for d in os.listdir(root) if STEP_DIR.match(d) and d < newest), reverse=True)
    for name in candidates:
        path = os.path.join(root, name)
        try:
            if not os.path.isdir(path):
                raise OSError(f"{path} (missing)")
            state, adapters = _read(path)
        except OSError as damaged:
            fallback = next((d for d in candidates if d < name), None)
            if os.path.isdir(path):
                shutil.rmtree(path + ".damaged", ignore_errors=True)
                os.replace(path, path + ".damaged")
            if fallback is None:
                raise CheckpointError(f"checkpoint file {damaged} is damaged and no complete checkpoint precedes "
                                      f"it in {root}; start the run again without --resume.") from None
            log(f"checkpoint file {damaged} is damaged; it was moved to {name}.damaged and the run resumes from "
                f"{fallback}, the newest complete checkpoint before it.")
            continue
        for adapter_name, weights in adapters.items():
            set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
        with open(latest + ".tmp", "w") as f:    # `latest` names what was actually resumed from
            f.write(name)
        os.replace(latest + ".tmp", latest)
        return path, state
    raise CheckpointError(f"--resume: no checkpoint in {root}; start without --resume.")


def truncate_jsonl(path, step):
    """Keep the lines of a step log whose "step" is <= `step` (atomic rewrite); no file, no-op."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
