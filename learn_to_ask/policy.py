"""Learn-to-Ask: learn when to ask and when to stop from offline dialogue logs (no simulator in the loop).

    python -m learn_to_ask make-logs     # sample logs: our simulator's customers vs a privileged expert
    python -m learn_to_ask prepare       # logs -> (context, observed future) samples, train/test split
    python -m learn_to_ask calibrate learn_to_ask.grader=llm   # grader prompts vs hand labels
    python -m learn_to_ask train         # GRPO + LoRA on the single-step samples (~15 min on a CPU)
    python -m learn_to_ask eval [--adapter runs/learn_to_ask]  # base (no adapter) or trained; + stop diagnosis
    python -m learn_to_ask play [--adapter runs/learn_to_ask]  # online check against the simulator

Learn-to-Ask ("Grounded in Reality", arXiv 2510.25441) turns expert logs into single-step RL samples
(data.py: each log cut after every customer turn, `decision_truth` and `info_truth` from the
observed future), which the policy answers with an (action, state assessment) pair scored by the
published reward R = R_s * (1 + beta * R_a) + P (reward.py). This file is the policy side: its
prompt, sampling with a prefilled `<action>`, GRPO, evaluation with the stop diagnosis, and the
online check against the Cognitive User Simulator.

The stop decision is the method's headline. A stop is only learnable if the policy samples one: with
the reply prefilled as `<action>`, a stop must continue with `<stop/>`, and the tokenizer writes
"<action><stop/>" with a merged "><" token, so after the prefill's ">" a bare "<" is almost never
sampled (measured: P(stop) ~0.0000 on stop samples). The format therefore puts a space after
`<action>` (' <' 'stop' '/>' is a natural continuation), and the prompt says when a call is over
(the customer has decided) with an example of each action; `eval` reports the exact probability of
the stop marker on stop and on continue samples, and how often it is sampled (docs/learn_to_ask.md). Training
batches hold `stop_fraction` stop samples, so GRPO meets the rare stop often enough to amplify it.

Simplified or chosen here: no KL to a reference (the paper's example uses 0.001) and one epoch per
batch of samples; the reply is prefilled with `<action>` and decoding stops at `</state>` (a stop
string, as peers' `reply_prefix` / vLLM `stop`), because a 135M model rarely writes the tags unaided;
the LLM grader reads each score as a choice among A/B/C by log-probability instead of parsing free
text; the proxy grader (cue matching) stands in for it on the CPU and in tests.
"""

import argparse
import hashlib
import json
import os
import random
import time

import torch

import checkpoint
import config
import eval as evaluation
import kvbatch
import lm
import losses
import personas as P
import runfiles
import simulator as S
from kvbatch import KVBatch
from learn_to_ask import data as D, load_config, reward as R

POLICY_SYSTEM = (
    "You are the caller on a sales call. Ask one short question at a time to find out what worries the "
    "customer. Reply with exactly two tags:\n"
    "<action> one short question </action><state> what you know so far </state>\n"
    "The call is over as soon as the customer has decided: they said yes, said no, or said goodbye. Then ask "
    "nothing more and reply exactly:\n"
    "<action> <stop/> </action><state> what you know so far </state>\n"
    "Examples:\n"
    "Customer: Hello?\n"
    "Reply: <action> Is there anything about this that worries you? </action><state> No worry named yet. </state>\n"
    "Customer: Okay, let's do it. Sign me up.\n"
    "Reply: <action> <stop/> </action><state> They agreed. </state>")
STOP_REPLY = " <stop/>"     # what a stop looks like right after the prefilled "<action>": ' <' 'stop' '/>'
                            # (without the space, the tokenizer merges "><" and the marker is unreachable)


def prompt_ids(tokenizer, context, prefix=""):
    """The policy's prompt: our system block (format rules + the log's own system message, if any),
    every message of the context, the assistant header and the reply prefix. List of ids."""
    system, rest = POLICY_SYSTEM, context
    if context and context[0]["role"] == "system":
        system, rest = f"{POLICY_SYSTEM}\n\nCall details: {context[0]['content']}", context[1:]
    ids = lm.flat_message_ids(tokenizer, "system", system)
    for m in rest:
        ids += lm.flat_message_ids(tokenizer, m["role"], m["content"])
    return ids + lm.encode(tokenizer, lm.generation_header(tokenizer)) + lm.encode(tokenizer, prefix)


@torch.no_grad()
def sample_completions(model, tokenizer, prompts, n, max_new_tokens, temperature, generator, prefix="", chunk=8):
    """n completions per prompt, all in one KVBatch, decoded `chunk` tokens at a time so that a row
    leaves at its end-of-turn token or at the token that completes `</state>` (a stop string: the
    text is cut right after it, the tokens after that token). Returns, per prompt, n tuples
    (sampled tokens, their rollout log-probs, text = prefix + decoded tokens)."""
    eos = lm.end_of_turn_ids(tokenizer)[0]
    batch = KVBatch(model, tokenizer.pad_token_id, adapter=True)
    keys = [(p, j) for p in range(len(prompts)) for j in range(n)]
    for k in keys:
        batch.add(k, prompts[k[0]])
    tokens, logprobs, done = {k: [] for k in keys}, {k: [] for k in keys}, set()
    decode = lambda ts: prefix + tokenizer.decode(ts[:-1] if ts and ts[-1] == eos else ts)
    text = lambda ts: decode(ts).split(R.STOP_TEXT)[0] + R.STOP_TEXT if R.STOP_TEXT in decode(ts) else decode(ts)
    while len(done) < len(keys):
        live = [k for k in keys if k not in done]         # every live row has generated the same count
        out = batch.generate(min(chunk, max_new_tokens - len(tokens[live[0]])), {eos}, temperature, 1.0, generator)
        for k in live:
            start = len(tokens[k])
            tokens[k] += out[k][0]
            logprobs[k] += out[k][1]
            if R.STOP_TEXT in decode(tokens[k]):
                cut = next(i for i in range(start + 1, len(tokens[k]) + 1) if R.STOP_TEXT in decode(tokens[k][:i]))
                tokens[k], logprobs[k] = tokens[k][:cut], logprobs[k][:cut]
                done.add(k)
            elif tokens[k][-1] == eos or len(tokens[k]) >= max_new_tokens:
                done.add(k)
        batch.drop([k for k in live if k in done])
    return [[(tokens[(p, j)], logprobs[(p, j)], text(tokens[(p, j)])) for j in range(n)] for p in range(len(prompts))]


def grpo_update(model, optimizer, prompts, completions, advantages, lt, temperature):
    """`epochs` passes of clipped policy-gradient updates over completion tokens (token mean over the
    step; completions with zero advantage carry no gradient and are skipped). The log-probs are
    recomputed on prompt + completion ids exactly as sampled, through the model's own head; the "old"
    log-probs of the ratio are the first pass's own, detached (savpo.Trainer.update's convention), so
    the first ratio is exactly 1. Returns stats, averaged over the passes."""
    total = sum(len(c[0]) for c in completions) or 1
    active = [i for i, c in enumerate(completions) if advantages[i] != 0 and c[0]]
    params = [p for p in model.parameters() if p.requires_grad]
    keys = ("pg_loss", "clip_frac", "grad_norm")
    stats, old = {k: 0.0 for k in keys}, {}
    for _ in range(lt["epochs"]):
        optimizer.zero_grad(set_to_none=True)
        model.train()
        for start in range(0, len(active), lt["micro_batch"]):
            idx = active[start:start + lt["micro_batch"]]
            rows = [prompts[i] + completions[i][0] for i in idx]
            b = torch.tensor([r for r, i in enumerate(idx) for _ in completions[i][0]])
            c = torch.tensor([len(prompts[i]) - 1 + t for i in idx for t in range(len(completions[i][0]))])
            logits = lm.selected_logits(model, rows, (b, c))                                     # (N, V)
            target = torch.tensor([t for i in idx for t in completions[i][0]], device=logits.device)
            logp = lm.token_logprobs(logits, target, temperature)
            if idx[0] not in old:
                old.update(zip(idx, logp.detach().split([len(completions[i][0]) for i in idx])))
            old_logp = torch.cat([old[i] for i in idx])
            adv = torch.tensor([float(advantages[i]) for i in idx for _ in completions[i][0]], device=logits.device)
            pg, clip, _ = losses.clipped_pg_loss(logp[None], old_logp[None], adv[None], torch.ones_like(adv)[None],
                                                 eps_low=lt["eps_low"], eps_high=lt["eps_high"])
            (pg * len(target) / total).backward()
            stats["pg_loss"] += pg.item() * len(target) / total / lt["epochs"]
            stats["clip_frac"] += clip.item() * len(target) / total / lt["epochs"]
        model.eval()
        if active:
            stats["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, lt["grad_clip"])) / lt["epochs"]
            optimizer.step()
    return stats


def save_checkpoint(model, optimizer, step, root):
    """savpo.py's checkpoint layout and atomic `latest` pointer (checkpoint.py)."""
    return checkpoint.write(root, step, model, {"optimizer": optimizer.state_dict(), "step": step,
                                                      "rng": {"torch": torch.get_rng_state(),
                                                              "python": random.getstate()}})


def step_batches(samples, k, stop_fraction, seed):
    """step -> the k training samples of that step: fixed seeded walks over the stop and the continue
    samples, round(k * stop_fraction) from the first (0 = no balancing: one walk over all samples, the
    data's own share of stops). A function of the seed and the step only, so a resumed run sees the
    same batches."""
    rng = random.Random(seed)
    if stop_fraction <= 0:
        order = rng.sample(samples, len(samples))
        return lambda step: [order[(step * k + i) % len(order)] for i in range(k)]
    stops = rng.sample([s for s in samples if s["decision_truth"] == "stop"], sum(s["decision_truth"] == "stop" for s in samples))
    conts = rng.sample([s for s in samples if s["decision_truth"] != "stop"], len(samples) - len(stops))
    n_stop = round(k * stop_fraction)
    for kind, pool, wanted in (("stop", stops, n_stop), ("continue", conts, k - n_stop)):
        if wanted and not pool:
            raise D.LogError(f"the training samples hold no {kind} sample, and learn_to_ask.stop_fraction="
                             f"{stop_fraction} asks for {wanted} a step; set learn_to_ask.stop_fraction=0 (the data's "
                             f"own share).")
    return lambda step: ([stops[(step * n_stop + i) % len(stops)] for i in range(n_stop)] +
                         [conts[(step * (k - n_stop) + i) % len(conts)] for i in range(k - n_stop)])


def train(cfg, resume=False):
    """GRPO over single-step samples: each step, `samples_per_step` samples x `group_size` sampled
    replies -> rewards -> advantages normalised within each sample's group (losses.stpr_advantages in
    'outcome' mode) -> clipped policy gradient on the LoRA policy. Logs and checkpoints as savpo.py."""
    lt = cfg["learn_to_ask"]
    out, seed = lt["out_dir"], cfg["seed"]
    metrics_path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics_path) and not resume:
        raise D.LogError(f"{out} already holds a training run; continue it with --resume or set learn_to_ask.out_dir.")
    samples = D.load_samples(cfg, "train")
    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer, base = lm.load_model(cfg["model"])
    model = lm.add_lora(base, cfg["lora"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lt["lr"], weight_decay=0.0)
    grade, step = R.make_grader(cfg, model, tokenizer), 0
    if resume:   # the newest complete checkpoint (a damaged one is reported and skipped; none: step 0)
        try:
            _, state = checkpoint.resume(out, model)
        except checkpoint.CheckpointError as e:
            raise D.LogError(str(e)) from None
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
            step = state["step"]
    config.save(cfg, out)
    k, G, T = lt["samples_per_step"], lt["group_size"], lt["temperature"]
    batches = step_batches(samples, k, lt["stop_fraction"], seed)
    print(f"GRPO on {len(samples)} training samples: {lt['steps']} steps x {k} samples x {G} completions, "
          f"reward {lt['reward']}, grader {lt['grader']}; writing to {out}")
    from tqdm import tqdm
    for step in tqdm(range(step, lt["steps"]), initial=step, total=lt["steps"], desc="learn-to-ask", unit="step"):
        t0 = time.perf_counter()
        batch = batches(step)
        prompts = [prompt_ids(tokenizer, s["context"], lt["response_prefix"]) for s in batch]
        generator = kvbatch.device_generator(seed * 100_003 + step, model)
        groups = sample_completions(model, tokenizer, prompts, G, lt["max_new_tokens"], T, generator, lt["response_prefix"])
        gen_s = time.perf_counter() - t0
        flat = [c for g in groups for c in g]                                    # (k * G) completions
        records = R.score([s for s in batch for _ in range(G)], [c[2] for c in flat], grade, lt)
        rewards = torch.tensor([r["R"] for r in records])
        adv, _ = losses.stpr_advantages(rewards, [torch.zeros(1)] * len(flat), torch.arange(k).repeat_interleave(G),
                                        mode="outcome")
        stats = grpo_update(model, optimizer, [p for p in prompts for _ in range(G)], flat, adv, lt, T)
        n_tok = sum(len(c[0]) for c in flat)
        record = {"step": step + 1, **R.summarize(records), "reward_std": round(float(rewards.std(unbiased=False)), 4),
                  **{k_: round(v, 5) for k_, v in stats.items()}, "gen_tok_s": round(n_tok / gen_s, 1),
                  "step_s": round(time.perf_counter() - t0, 1)}
        runfiles.append_jsonl(metrics_path, record)
        if (step + 1) % lt["save_every"] == 0 or step + 1 == lt["steps"]:
            save_checkpoint(model, optimizer, step + 1, os.path.join(out, "checkpoints"))
        tqdm.write(f"step {step + 1:3d} | reward {record['reward']:.2f} (std {record['reward_std']:.2f}) decision "
                   f"{record['decision_acc']:.2f} format {record['format_mean']:.2f} content {record['content_mean']:.2f} "
                   f"malformed {record['malformed']:.2f} | pg {record['pg_loss']:+.4f} | {record['step_s']:.0f}s")
    print(f"outputs: {metrics_path}, {out}/config.yaml, {out}/checkpoints/ (evaluate: "
          f"python -m learn_to_ask eval --adapter {out})")
    return model


def load_policy(cfg, adapter):
    """The base model, with a trained adapter if `adapter` names one: an adapter folder, a
    checkpoint folder, or a run folder (its latest checkpoint)."""
    tokenizer, model = lm.load_model(cfg["model"])
    if not adapter:
        return tokenizer, model
    for candidate in (adapter, os.path.join(adapter, "adapter")):
        if os.path.exists(os.path.join(candidate, "adapter_config.json")):
            break
    else:
        latest = os.path.join(adapter, "checkpoints", "latest")
        if not os.path.exists(latest):
            raise D.LogError(f"--adapter '{adapter}' holds no adapter, checkpoint or run with checkpoints/latest.")
        with open(latest, encoding="utf-8", errors="replace") as f:
            candidate = os.path.join(adapter, "checkpoints", f.read().strip(), "adapter")
    model = lm.load_adapter(model, candidate)
    model.eval()
    return tokenizer, model


def stop_probability(model, tokenizer, samples, lt):
    """The exact chance, per sample, that the policy's reply starts with the stop marker right after
    the prefilled `<action>` (teacher-forced log-probs at the sampling temperature): whether GRPO can
    ever sample a stop to reinforce. With G replies the chance of at least one is 1 - (1 - p)^G."""
    marker = lm.encode(tokenizer, STOP_REPLY)
    out = []
    with torch.no_grad():
        for s in samples:
            prompt = prompt_ids(tokenizer, s["context"], lt["response_prefix"])
            pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(marker))
            logits = lm.selected_logits(model, [prompt + marker], (torch.zeros_like(pos), pos))
            out.append(float(lm.token_logprobs(logits, torch.tensor(marker, device=logits.device), lt["temperature"]).sum().exp()))
    return out


def _load_report(cfg, name):
    """OUT_DIR/NAME.json as {label: result}; a file that cannot be read is a LogError naming it."""
    path = os.path.join(cfg["learn_to_ask"]["out_dir"], name + ".json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (ValueError, OSError) as e:
        raise D.LogError(f"{path} cannot be read ({' '.join(str(e).split())[:80]}); move it aside and run again "
                         f"(it collects the results of earlier runs).") from None
    if not isinstance(results, dict):
        raise D.LogError(f"{path} is not a mapping of results; move it aside and run again.")
    return results


def _report(cfg, name, label, result, columns):
    """Merge `result` under `label` into OUT_DIR/NAME.json and rewrite NAME.md as a table (each written
    whole, then renamed)."""
    out = cfg["learn_to_ask"]["out_dir"]
    results = _load_report(cfg, name)
    results[label] = result
    runfiles.write_json(os.path.join(out, name + ".json"), results, indent=1)
    cell = lambda r, c: r.get(c, "-") if isinstance(r, dict) else "-"
    table = R.md_table(["metric", *results], [[c, *(cell(r, c) for r in results.values())] for c in columns])
    runfiles.write_text(os.path.join(out, name + ".md"), table + "\n")
    return table


def evaluate(cfg, adapter=None):
    """`eval_rollouts` sampled replies to each of `n_eval_samples` test samples (a fixed hash order),
    by the base model or with `adapter`; the metric set is merged into OUT_DIR/eval.json and eval.md."""
    lt = cfg["learn_to_ask"]
    samples = D.load_samples(cfg, "test")
    samples = sorted(samples, key=lambda s: hashlib.sha1(s["sample_id"].encode()).hexdigest())[:lt["n_eval_samples"]]
    tokenizer, model = load_policy(cfg, adapter)
    grade, n = R.make_grader(cfg, model, tokenizer), lt["eval_rollouts"]
    generator = kvbatch.device_generator(cfg["seed"] + 7, model)
    from tqdm import tqdm
    texts = []
    for start in tqdm(range(0, len(samples), 8), desc="eval", unit="batch"):
        prompts = [prompt_ids(tokenizer, s["context"], lt["response_prefix"]) for s in samples[start:start + 8]]
        texts += [c[2] for g in sample_completions(model, tokenizer, prompts, n, lt["max_new_tokens"], lt["temperature"],
                                                   generator, lt["response_prefix"]) for c in g]
    records = R.score([s for s in samples for _ in range(n)], texts, grade, lt)
    result = R.summarize(records)
    # the stop diagnosis: how often the stop marker is sampled, and its exact probability after the prefix
    p_stop = stop_probability(model, tokenizer, samples, lt)
    for truth in ("stop", "continue"):
        picked = [r for r in records if r["truth"] == truth]
        result[f"stops_per_100_on_{truth}"] = round(100 * sum(r["kind"] == "stop" for r in picked) / max(1, len(picked)), 1)
        probs = [p for s, p in zip(samples, p_stop) if s["decision_truth"] == truth]
        result[f"p_stop_on_{truth}"] = round(sum(probs) / max(1, len(probs)), 4)
    per_sample = {s["sample_id"]: sum(r["R"] for r in records[i * n:(i + 1) * n]) / n for i, s in enumerate(samples)}
    label = f"trained ({adapter})" if adapter else "base"
    base = (_load_report(cfg, "eval").get("base") or {}).get("per_sample_reward")
    if adapter and base:
        result["reward_minus_base"] = session_difference(base, per_sample)
    table = _report(cfg, "eval", label, {**result, "per_sample_reward": per_sample}, list(result))
    print(f"{len(samples)} test samples x {n} rollouts, grader {lt['grader']}, reward {lt['reward']}; "
          f"examples: {texts[:2]}\n{table}")
    return result


def session_difference(base, trained):
    """[mean, low, high] of trained - base reward, paired over the same test samples ({sample_id:
    mean reward}), with the session (one customer, sample ids "SESSION#k") as the unit of the 95%
    bootstrap interval: a session's samples share a customer, so they are not independent draws."""
    sessions = {}
    for k in sorted(set(base) & set(trained)):
        sessions.setdefault(k.rsplit("#", 1)[0], []).append(trained[k] - base[k])
    return evaluation.bootstrap([sum(d) / len(d) for d in sessions.values()])


def play(cfg, adapter=None):
    """The question-asker against the Cognitive User Simulator (`simulator` config, turn budget
    `play_turns`): each reply's question is the agent's turn. When the customer decides (accepts,
    rejects or says goodbye), the policy gets one more reply, with that line as the last message: the
    call is over, so the right reply is the stop. Verdicts: 'right' = it stopped then; 'late' = it
    asked on; 'early' = it stopped before the customer decided; 'no stop' = the turn budget ran out
    first. A reply is a stop by the reward's rule (`R.decide`); a malformed question is spoken with
    its tags removed, and counted."""
    lt = cfg["learn_to_ask"]
    os.makedirs(lt["out_dir"], exist_ok=True)
    tokenizer, model = load_policy(cfg, adapter)
    persona_list = P.sample_many(lt["domains"], lt["play_n"], lt["play_seed"])
    sim_tokenizer, sim_model = tokenizer, model      # the base with the adapter disabled, or simulator.model
    if S.own_model(cfg["simulator"]["model"]):   # "" or an endpoint URL: none to load
        sim_tokenizer, sim_model = lm.load_model({**cfg["model"], "name_or_path": cfg["simulator"]["model"], "warm_start": ""})
    sim = S.CognitiveUserSimulator({**cfg["simulator"], "max_turns": lt["play_turns"]}, sim_model, sim_tokenizer,
                                   seed=cfg["seed"], decoder=kvbatch.decoder_for(sim_model, cfg["rollout"]))
    dialogues = [[{"role": "system", "content": D.call_details(p)}, {"role": "user", "content": o}]
                 for p, o in zip(persona_list, sim.reset(persona_list))]
    n = len(persona_list)
    phase, verdicts, malformed = ["talk"] * n, ["no stop"] * n, 0
    generator = kvbatch.device_generator(cfg["seed"] + 11, model)
    from tqdm import tqdm
    bar = tqdm(total=lt["play_turns"] + 1, desc="play", unit="turn", leave=False)   # + the reply after a decision
    while any(p in ("talk", "decided") for p in phase):
        ask = [i for i in range(n) if phase[i] in ("talk", "decided")]
        prompts = [prompt_ids(tokenizer, dialogues[i], lt["response_prefix"]) for i in ask]
        replies = sample_completions(model, tokenizer, prompts, 1, lt["max_new_tokens"], lt["temperature"],
                                     generator, lt["response_prefix"])
        agent_msgs = [None] * n
        for i, ((_, _, text),) in zip(ask, replies):
            kind, question, exact = R.decide(text, "published")
            if phase[i] == "decided":            # the customer has decided: the one right reply is the stop
                verdicts[i], phase[i] = ("right" if kind == "stop" else "late"), "over"
                continue
            if kind == "stop":
                verdicts[i], phase[i] = "early", "over"
                sim.abort(i, "stopped")
                continue
            malformed += not exact
            agent_msgs[i] = question or "..."
            dialogues[i].append({"role": "assistant", "content": agent_msgs[i]})
        if any(m is not None for m in agent_msgs):
            user_msgs, states, done = sim.step(agent_msgs)
            for i in range(n):
                if agent_msgs[i] is not None:
                    dialogues[i].append({"role": "user", "content": user_msgs[i]})
                    if done[i]:
                        phase[i] = "decided" if states[i].decision in ("accept", "reject", "hangup") else "over"
        bar.set_postfix_str(f"{phase.count('over')}/{n} calls over", refresh=False)
        bar.update(1)
    bar.close()
    for i, p in enumerate(persona_list):
        print(f"{p.persona_id} [{p.domain}] revealed {sum(v != 'hidden' for v in sim.states[i].concern_status.values())}"
              f"/{len(p.concerns)}, customer: {sim.states[i].decision}, policy: {verdicts[i]}")
    runfiles.write_jsonl(os.path.join(lt["out_dir"], "play_dialogues.jsonl"), (    # why each call went as it did
        {"persona_id": p.persona_id, "domain": p.domain, "stratum": p.stratum, "willingness": p.willingness,
         "hidden_concerns": {c.id: c.statement for c in p.concerns},
         "concerns": [{"id": c.id, "statement": c.statement, "severity": c.severity, "disclosure": c.disclosure}
                      for c in p.concerns],
         "verdict": v, "final_state": st.to_dict(), "messages": d}
        for p, d, v, st in zip(persona_list, dialogues, verdicts, sim.states)))
    total = sum(len(p.concerns) for p in persona_list)
    revealed = sum(v != "hidden" for s in sim.states for v in s.concern_status.values())
    decided = sum(v in ("right", "late") for v in verdicts)
    result = {"dialogues": n, "concerns_revealed": f"{revealed}/{total}", "reveal_rate": round(revealed / total, 3),
              "customer_decided": decided,
              "stopped_right_after_decision": round(verdicts.count("right") / max(1, decided), 3),
              **{f"stop_{v.replace(' ', '_')}": round(verdicts.count(v) / n, 3) for v in ("right", "late", "early", "no stop")},
              "agent_turns": round(sum(len([m for m in d if m["role"] == "assistant"]) for d in dialogues) / n, 2),
              "malformed_turns": malformed}
    print(_report(cfg, "play", f"trained ({adapter})" if adapter else "base", result, list(result)))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="Learn-to-Ask: offline logs -> a question-asking policy.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [("make-logs", "write sample logs (simulator customers vs a privileged expert)"),
                       ("prepare", "cut logs into (context, observed future) samples"),
                       ("calibrate", "grader agreement with the hand labels"), ("train", "GRPO + LoRA"),
                       ("eval", "metrics on the test samples"), ("play", "online check against the simulator")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("overrides", nargs="*", help="config overrides, e.g. learn_to_ask.steps=3")
        p.add_argument("--config", default=None, help="a YAML file overriding config.yaml")
        if name in ("eval", "play"):
            p.add_argument("--adapter", default=None, help="adapter, checkpoint or run folder (default: base model)")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/latest")
    args, extra = parser.parse_known_args(argv)
    if any(x.startswith("-") or "=" not in x for x in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides += extra                     # key=value overrides given after a --flag
    try:
        cfg = load_config(args.config, args.overrides)
    except config.ConfigError as e:
        raise SystemExit(f"config error: {e}")
    torch.manual_seed(cfg["seed"])
    try:
        if args.command == "make-logs":
            D.make_logs(cfg)
        elif args.command == "prepare":
            D.prepare(cfg)
        elif args.command == "calibrate":
            R.calibrate(cfg)
        elif args.command == "train":
            train(cfg, resume=args.resume)
        elif args.command == "eval":
            evaluate(cfg, args.adapter)
        else:
            play(cfg, args.adapter)
    except (D.LogError, lm.ModelError, P.DomainError, config.ConfigError) as e:
        raise SystemExit(str(e))


if __name__ == "__main__":
    main()
