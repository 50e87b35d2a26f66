"""Warm start: a short supervised stage on expert calls, so a small policy can hold a call and read the
privileged note before reinforcement learning starts.

    python warmstart.py                                   # -> runs/warmstart/adapter, ~31 min on 2 CPU cores
    python warmstart.py --release                         # ... and rebuild the shipped one, data/warmstart/
    python savpo.py model.warm_start=runs/warmstart/adapter        # every method then starts from it
    python eval.py --pilot model.warm_start=runs/warmstart/adapter # the premise: does the note help now?

The shipped warm start (`data/warmstart/`, config.yaml's default `model.warm_start`) is this stage's adapter
for the default config, stored in float16 (4.9 MB: LoRA r 8 on every projection of the 135M model), with the
config it was made with and MANIFEST.json (command, seeds, SHA-256, cross-entropies, time, machine). A run
whose model, note, placement or expert-call set differ from it (`MUST_MATCH`) is refused in one sentence,
so a new user's `python savpo.py` starts from a policy that can hold a call without 31 minutes first.

Why: the embedded 135M model, given the hidden concerns in its prompt, mostly *narrates* them ("They're
worried about moving house.") instead of asking, and often writes the callee's part; a teacher that does
not use its privileged view has nothing to distil. A supervised stage on calls that go well is the
standard lever (the published systems start their RL from an instruction-tuned or SFT policy).

The expert is scripted and sees the hidden concerns (`expert_turn`): it greets, asks about each concern
with the expert questions (`data/logs/expert_questions.yaml`, a `guarded` concern twice), answers each
once voiced with its shortest true answer of the bank, then asks for the decision -- one move of each
kind per turn at most, within the policy's own turn budget (`rollout.max_new_tokens`). It plays
`warmstart.calls` personas of seed `warmstart.seed` (disjoint from the evaluation personas, checked)
against the template simulator. Every call becomes training sequences tokenised exactly as `rollout.run`
feeds the policy (`rollout.render_call`): the conversation-only view, the privileged view (the note of
`aopsd.note` at `aopsd.placement`), or both (`warmstart.views`). The loss is the cross-entropy of the
agent's tokens (each turn's end-of-turn token included), a LoRA adapter of the `lora:` shape trained for
`warmstart.epochs` passes. `model.warm_start` then folds it into the weights (`lm.merge_warm_start`).

What this chooses where the paper is silent: the same expert calls in both views, so the student view
learns the conversation (greet, ask, answer the voiced worry with its fact, ask for the decision) and
the privileged view also learns to read the note; trained on moves that depended on the note, the
student learns to ask about *some* concern -- which one is what the privileged view knows and SAVPO's
distillation has to carry over.
"""

import datetime
import hashlib
import os
import platform
import random
import sys
import time

import torch

import config
import eval as evaluation
import lm
import personas as P
import rollout
import runfiles
from scripted_agents import play_scripted, push_line


def shortest_answer(tokenizer, concern):
    """The shortest of a concern's bank answers (its resolution and answer exemplars) in tokens."""
    options = [concern["resolution"], *concern.get("answer_examples", [])]
    return min(options, key=lambda text: len(lm.encode(tokenizer, text)))


def expert_turn(obs, tokenizer, budget):
    """One turn of the concise privileged expert: a greeting on the first turn, an answer to one voiced
    worry, then a question about one hidden concern (two if nothing is to be answered), or, nothing left,
    the decision ask -- as many of these as fit `budget` tokens, in that order."""
    bank, questions = obs["bank"], P.expert_questions(obs["bank"]["name"])
    by_id = {c["id"]: c for c in bank["concerns"]}
    hidden = [c.id for c in obs["persona"].concerns if obs["status"][c.id] == "hidden"]
    voiced = sorted(obs["voiced"])
    moves = [f"Hi, this is Sam from {bank['agent']['company']}."] if obs["turn"] == 1 else []
    moves += [shortest_answer(tokenizer, by_id[cid]) for cid in voiced[:1]]
    for cid in hidden[:1 if voiced else 2]:
        moves.append(questions[cid][min(obs["asked"].get(cid, 0), 1)])
    if not hidden and not voiced[1:]:
        moves.append(push_line(bank))
    said, used = [], 0
    for move in moves:
        n = len(lm.encode(tokenizer, " " + move))
        if used + n <= budget or not said:
            said.append(move)
            used += n
    for cid in hidden:                                   # the questions actually asked count
        if any(q in said for q in questions[cid]):
            obs["asked"][cid] = obs["asked"].get(cid, 0) + 1
    return " ".join(said)


def expert_calls(cfg, tokenizer):
    """Play the concise expert against `warmstart.calls` personas -> [transcript dicts] (with persona)."""
    w = cfg["warmstart"]
    people = P.sample_many(cfg["personas"]["domains"], w["calls"], w["seed"])
    P.check_disjoint(people, evaluation.eval_personas(cfg))
    budget = cfg["rollout"]["max_new_tokens"] - 1                   # room for the end-of-turn token
    calls = []
    play_scripted(lambda obs: expert_turn(obs, tokenizer, budget), people, cfg["simulator"], w["seed"],
                  transcripts=calls)
    return [{**call, "persona": p} for call, p in zip(calls, people)]


def sequences(cfg, tokenizer, calls):
    """Each call as (ids, positions, targets) training sequences: the conversation-only view and/or the
    privileged view; positions[j] is where the logits predict targets[j], an agent token."""
    a, views = cfg["aopsd"], cfg["warmstart"]["views"]
    out = []
    for call in calls:
        traj = rollout.render_call(tokenizer, call["persona"], call["messages"], call["states"], call["decision"])
        pos = [j for j in range(len(traj.ids) - 1) if traj.agent_mask[j + 1]]
        if views in ("both", "student"):
            out.append((traj.ids, pos, [traj.ids[j + 1] for j in pos]))
        if views in ("both", "privileged"):
            ids, index = rollout.teacher_view(traj, rollout.note_ids(tokenizer, traj.persona, a["note"]), a["placement"])
            out.append((ids, [index[j + 1] - 1 for j in pos], [traj.ids[j + 1] for j in pos]))
    return out


def train(cfg, log=print):
    """The supervised stage: expert calls -> sequences -> LoRA cross-entropy on the agent's tokens.
    Writes OUT/adapter (PEFT; OUT/epochN after each epoch), OUT/calls.jsonl (the expert's calls), OUT/metrics.jsonl, OUT/config.yaml."""
    w = cfg["warmstart"]
    P.check_domains(cfg["personas"]["domains"], "guide")    # the expert asks its questions: every bank needs them
    torch.manual_seed(cfg["seed"])
    tokenizer, base = lm.load_model({**cfg["model"], "warm_start": ""})
    t0 = time.perf_counter()
    calls = expert_calls(cfg, tokenizer)
    won = sum(c["decision"] == "accept" for c in calls)
    log(f"{len(calls)} expert calls ({won} accepted) in {time.perf_counter() - t0:.0f}s")
    data = sequences(cfg, tokenizer, calls)
    model = lm.add_lora(base, cfg["lora"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=w["lr"])
    os.makedirs(w["out_dir"], exist_ok=True)
    config.save(cfg, w["out_dir"])
    runfiles.write_jsonl(os.path.join(w["out_dir"], "calls.jsonl"), (
        {"persona_id": c["persona"].persona_id, "decision": c["decision"], "messages": c["messages"],
         "states": c["states"]} for c in calls))
    from tqdm import tqdm
    rng = random.Random(cfg["seed"])
    order = list(range(0, len(data), 2 if w["views"] == "both" else 1))     # a call's two views stay together
    metrics_path = os.path.join(w["out_dir"], "metrics.jsonl")
    runfiles.write_text(metrics_path, "")
    for epoch in range(w["epochs"]):
        rng.shuffle(order)
        model.train()
        total, tokens = 0.0, 0
        bar = tqdm(range(0, len(order), w["micro_batch"]), desc=f"warm start epoch {epoch + 1}", unit="batch",
                   file=sys.stderr)
        for start in bar:
            batch = [data[k + v] for k in order[start:start + w["micro_batch"]]
                     for v in range(2 if w["views"] == "both" else 1)]
            rows = torch.tensor([b for b, (_, pos, _) in enumerate(batch) for _ in pos])
            cols = torch.tensor([j for _, pos, _ in batch for j in pos])
            logits = lm.selected_logits(model, [ids[:pos[-1] + 1] for ids, pos, _ in batch], (rows, cols))   # (N, V)
            targets = torch.tensor([t for _, _, tg in batch for t in tg], device=logits.device)
            loss = torch.nn.functional.cross_entropy(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg["train"]["grad_clip"])
            optimizer.step()
            total += float(loss.detach()) * len(targets)
            tokens += len(targets)
            bar.set_postfix_str(f"loss {total / tokens:.3f}", refresh=False)
        bar.close()
        record = {"epoch": epoch + 1, "loss": round(total / tokens, 4), "agent_tokens": tokens,
                  "sequences": len(data), "elapsed_s": round(time.perf_counter() - t0, 1)}
        runfiles.append_jsonl(metrics_path, record)
        log(f"epoch {epoch + 1}: cross-entropy {record['loss']:.3f} over {tokens} agent tokens")
        with runfiles.atomic_dir(os.path.join(w["out_dir"], f"epoch{epoch + 1}")) as tmp:   # a long stage keeps
            model.save_pretrained(tmp)                                                       # what it has done
    # written whole, then renamed: `resolve` takes a folder with adapter_config.json for a finished warm start
    with runfiles.atomic_dir(os.path.join(w["out_dir"], "adapter")) as tmp:
        model.save_pretrained(tmp)
    return os.path.join(w["out_dir"], "adapter")


RELEASE = os.path.join(config.HERE, "data", "warmstart")     # the shipped warm start (config.yaml's default)
MUST_MATCH = config.WARM_START_MUST_MATCH


def resolve(cfg):
    """The warm start a run starts from, checked (`config.check_warm_start`). model.warm_start=auto: the
    adapter in warmstart.out_dir, trained first if it is not there yet; the run's saved config then names
    the folder, so eval.py plays its adapters on that base."""
    if cfg["model"]["warm_start"] == "auto":
        path = os.path.join(cfg["warmstart"]["out_dir"], "adapter")
        if not os.path.exists(os.path.join(path, "adapter_config.json")):
            print(f"model.warm_start=auto: no adapter in {path} yet; training it (warmstart.py)", flush=True)
            train({**cfg, "model": {**cfg["model"], "warm_start": ""}})
        cfg = {**cfg, "model": {**cfg["model"], "warm_start": path}}
    return config.check_warm_start(cfg)


def release(cfg, src, dest=RELEASE, command="python warmstart.py --release"):
    """The shipped warm start from a trained one (warmstart.out_dir `src`): DEST/adapter with the LoRA weights in
    float16 (half the bytes of float32, within 1e-3 relative of them; measured in MANIFEST.json), DEST/config.yaml
    (what `resolve` checks) and DEST/MANIFEST.json: the command, seeds, SHA-256 and size of the weights file, the
    cross-entropy of each epoch, the time and the machine. Written whole, then renamed."""
    from safetensors.torch import load_file, save_file
    weights = load_file(os.path.join(src, "adapter", "adapter_model.safetensors"))
    half = {k: v.to(torch.float16).contiguous() for k, v in weights.items()}
    drift = max(float(((half[k].float() - v).abs() / v.abs().clamp_min(1e-6)).median()) for k, v in weights.items())
    epochs = [line.record for line in runfiles.jsonl_lines(os.path.join(src, "metrics.jsonl")) if not line.problem]
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with runfiles.atomic_dir(dest) as tmp:
        os.makedirs(os.path.join(tmp, "adapter"))
        with open(os.path.join(src, "adapter", "adapter_config.json"), "rb") as f:
            runfiles.write_text(os.path.join(tmp, "adapter", "adapter_config.json"), f.read().decode("utf-8"))
        weights_path = os.path.join(tmp, "adapter", "adapter_model.safetensors")
        save_file(half, weights_path, metadata={"format": "pt"})
        config.save(cfg, tmp)
        with open(weights_path, "rb") as f:
            blob = f.read()
        runfiles.write_json(os.path.join(tmp, "MANIFEST.json"), {
            "command": command, "seed": cfg["seed"], "warmstart": cfg["warmstart"],
            "weights": "adapter/adapter_model.safetensors", "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob), "dtype": "float16", "median_relative_rounding": round(drift, 6),
            "train_dtype": str(lm.pick_dtype(cfg["model"]["dtype"], lm.pick_device(cfg["model"]["device"]))).split(".")[-1],
            "cross_entropy_by_epoch": [e["loss"] for e in epochs], "agent_tokens": epochs[-1]["agent_tokens"],
            "elapsed_s": epochs[-1]["elapsed_s"], "made": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads"}, indent=1)
    return dest



def main(argv=None):
    parsed = config.command_line(argv, __doc__)
    if parsed is None:
        return
    cfg, flags = parsed
    if set(flags) - {"release"}:
        raise SystemExit(f"unknown flag --{sorted(set(flags) - {'release'})[0]}; warmstart.py takes --config PATH, "
                         f"--release and key=value overrides.")
    cfg["model"]["warm_start"] = ""         # it trains on the base as published, whatever config.yaml starts runs from
    try:
        path = train(cfg)
    except (lm.ModelError, P.DomainError, config.ConfigError, ValueError) as e:
        raise SystemExit(str(e))
    print(f"adapter: {path}; use it with model.warm_start={path}")
    if flags.get("release"):
        cfg["model"]["warm_start"] = os.path.relpath(os.path.join(RELEASE, "adapter"), config.HERE)
        command = " ".join(["python warmstart.py", *(argv if argv is not None else sys.argv[1:])])
        print(f"the shipped warm start, rebuilt: {release(cfg, cfg['warmstart']['out_dir'], command=command)}")


if __name__ == "__main__":
    main()
