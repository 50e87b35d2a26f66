"""Rollout throughput: the incremental KV engine vs plain `model.generate`, side by side in one run.

    python bench.py                                   # 16 dialogues x 6 turns, embedded model, CPU
    python bench.py --sweep                           # + batch sizes x turn counts (kv vs batched generate)
    python bench.py --arch qwen2.5-1.5b --dialogues 64         # random-init model of a real size (GPU)
    python bench.py --arch qwen3-4b --write-model runs/qwen3-4b-random   # a folder for savpo.py's GPU path
    python bench.py --env --dialogues 8 --turns 3     # calls/s: CallEnv / CallBatch (env.py) vs the native rollout
    python bench.py --health --dialogues 4 --turns 3  # simulator health: in-process lines vs `transformers serve`
    python bench.py --step                            # training dialogues per minute: the default step vs the old one

Decoders run the *same* dialogues (same personas, greedy policy and simulator, the same per-turn
token budgets), each in its own subprocess so peak memory is its own:
  kv               kvbatch.KVBatch: per-dialogue KV caches, only each turn's new tokens prefilled
  kv_compiled      kvbatch.StaticKVBatch: the same with a fixed-capacity cache and a torch.compile'd decode
                   step (CUDA graphs on CUDA); an untimed identical run first compiles its shapes (`warmup_s`)
  generate_batched model.generate over all live dialogues, left-padded, re-prefilling whole dialogues
  generate_single  model.generate one dialogue at a time, re-prefilling (what most peers do)
  generate_static  generate_batched with a static, compiled cache (CUDA graphs): the strongest plain
                   baseline on a GPU (run by default on CUDA only; compiling on a CPU takes minutes)
Greedy decoding makes them produce identical dialogues when they are numerically consistent; the
table says whether they did. Reported: generated tokens/s (policy + simulator lines), prefill
tokens, wall time split into prefill / decode / the rest (simulator appraisal, bookkeeping), peak
memory (RSS on CPU, max allocated on CUDA) and, on a GPU, the decode memory-bandwidth utilisation:
the bytes every decode step must read (all weights, and the KV cache slots it attends over) divided
by the decode time and the card's peak bandwidth. The last line is JSON.

`--env` plays the same personas with the same greedy policy (the embedded model) three ways: the native
rollout (rollout.run, KV engine), CallEnv one call at a time with a plain `model.generate` loop over the
chat messages (docs/env.md's example), and CallBatch with one left-padded batched `generate` per turn;
bank lines and the lexical appraiser, every call played to `--turns` (patience off), so the work is equal.
It reports calls/s and the seconds spent inside the simulator. `--health` plays the same calls with the
callee's lines written by the embedded model in-process and by the same model behind `transformers serve`
(started here on 127.0.0.1, or `--endpoint URL --endpoint-model NAME`), and prints both simulators' health
counts. Both modes end with one JSON line.

`--step` times whole SAVPO training steps (rollouts -> advantages -> teacher pass + update, savpo.Trainer from
the shipped warm start, the config's personas) for two settings, each in its own subprocess: `before`, the
default step as it was until 2026-12-02 (float32, 2 personas x G 4 = 8 calls a step), and `now`, config.yaml as
it ships (`model.dtype: auto` = bf16 where the CPU multiplies it natively, 4 personas x G 8 in one wave, two
optimizer steps a step: one per 16 calls, as the 2 x G 8 default between them had; `before` has one per 8).
Both optimise the same loss and run today's code (its exact speed-ups and `rollout.fold_adapter` apply
to `before` too, so the ratio understates the gain over the step of 2026-12-02); reported per setting:
training dialogues per minute, the split (rollouts / teacher pass / student forward+backward), the tokens
of each view (conversation-only, privileged, agent), and the ratio.
`--step-overrides` replaces `now`'s settings (key=value ...). One JSON line last.
"""

import argparse
import contextlib
import hashlib
import json
import os
import resource
import subprocess
import sys
import time

import torch

import config
import endpoint as E
import env as callenv
import kvbatch
import lm
import personas as P
import rollout
import simulator as S

ARCHS = {  # real shapes, random weights: throughput and memory depend on these, not on training
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "tiny-qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,   # tests
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=49152),
}
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L4": 0.3e12, "4090": 1.0e12}


class GenerateBatch:
    """Drop-in for KVBatch built on `model.generate`: every call re-prefills each row's whole
    sequence. batched=True left-pads all rows into one call; False loops over rows."""

    def __init__(self, model, pad_id, adapter=True, batched=True, static=False):
        self.model, self.pad_id, self.adapter, self.batched, self.static = model, pad_id, adapter, batched, static
        self.keys, self.rows = [], {}
        self.prefill_tokens = self.generated_tokens = self.decode_steps = self.kv_slots_read = 0
        self.prefill_s = self.decode_s = 0.0    # not separable inside generate: all counted as decode

    def add(self, key, ids):
        self.keys.append(key)
        self.rows[key] = list(ids)

    def extend(self, key, ids):
        self.rows[key].extend(ids)

    def ids(self, key):
        return self.rows[key]

    def drop(self, keys):
        for k in keys:
            del self.rows[k]
        self.keys = [k for k in self.keys if k in self.rows]

    def rollback(self, key, n_tokens):
        del self.rows[key][len(self.rows[key]) - n_tokens:]

    @torch.no_grad()
    def _generate(self, keys, max_new_tokens, stop_ids, temperature, top_p):
        device = next(self.model.parameters()).device
        width = max(len(self.rows[k]) for k in keys)
        ids = torch.full((len(keys), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, k in enumerate(keys):
            row = self.rows[k]
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        ctx = contextlib.nullcontext() if self.adapter else lm.adapter_off(self.model)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.static:   # the strongest plain baseline on a GPU: a static cache, compiled decode (CUDA graphs)
            sampling["cache_implementation"] = "static"
        t0 = time.perf_counter()
        with ctx:
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      max_new_tokens=max_new_tokens, eos_token_id=sorted(stop_ids),
                                      pad_token_id=self.pad_id, output_scores=True,
                                      return_dict_in_generate=True, **sampling)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.decode_s += time.perf_counter() - t0
        self.prefill_tokens += int(mask.sum())
        self.decode_steps += len(out.scores) - 1
        self.kv_slots_read += len(keys) * sum(width + s for s in range(1, len(out.scores)))
        result = {}
        for i, k in enumerate(keys):
            new = out.sequences[i, width:].tolist()
            tokens, logprobs = [], []
            for step, tok in enumerate(new):
                tokens.append(tok)
                logprobs.append(float(torch.log_softmax(out.scores[step][i].float(), -1)[tok]))
                if tok in stop_ids:
                    break
            self.rows[k].extend(tokens)
            self.generated_tokens += len(tokens)
            result[k] = (tokens, logprobs)
        return result

    def generate(self, max_new_tokens, stop_ids, temperature=0.0, top_p=1.0, generator=None):
        if self.batched:
            return self._generate(self.keys, max_new_tokens, stop_ids, temperature, top_p)
        out = {}
        for k in self.keys:
            out.update(self._generate([k], max_new_tokens, stop_ids, temperature, top_p))
        return out


def load(args):
    if args.arch:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        lm.quiet_transformers()
        tokenizer = AutoTokenizer.from_pretrained(lm.embedded_path())  # ids < 49152 fit any vocab below
        spec = dict(ARCHS[args.arch])
        model_config = AutoConfig.for_model(spec.pop("model_type"), **spec, tie_word_embeddings=False)
        device = lm.pick_device("auto")
        dtype = lm.pick_dtype(args.dtype, device)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
        if args.quantization != "none":  # quantise the random weights the way from_pretrained would
            import tempfile
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                del model
                tokenizer, model = lm.load_model({"name_or_path": tmp, "quantization": args.quantization,
                                                  "dtype": args.dtype, "device": "auto"})
        return tokenizer, model.eval()
    return lm.load_model({"name_or_path": args.model, "quantization": args.quantization, "dtype": args.dtype,
                          "device": "auto"})


def run_one(args, method, tokenizer, model):
    cfg = config.load()
    sim_cfg = {**cfg["simulator"], "appraiser": "lexical", "utterance": "llm", "temperature": 0.0,
               "max_turns": args.turns, "max_new_tokens": args.user_tokens,
               "rules": {**cfg["simulator"]["rules"], "patience": 10 ** 6, "reject_threshold": -1.0}}
    roll_cfg = {**cfg["rollout"], "temperature": 0.0, "max_new_tokens": args.policy_tokens, "max_context": 8192}
    made = []

    def decoder(model_, pad_id, adapter=True):
        if method == "kv":
            d = kvbatch.KVBatch(model_, pad_id, adapter)
            d.sync = True
        elif method == "kv_compiled":   # on CUDA one capacity for the whole run: one graph per view
            capacity = 2048 + args.policy_tokens if torch.cuda.is_available() else None
            d = kvbatch.StaticKVBatch(model_, pad_id, adapter, capacity=capacity)
            d.sync = True
        else:
            d = GenerateBatch(model_, pad_id, adapter, batched=(method != "generate_single"),
                              static=(method == "generate_static"))
        made.append(d)
        return d

    people = P.sample_many(cfg["personas"]["domains"], args.dialogues, seed=0)
    sim = S.CognitiveUserSimulator(sim_cfg, model, tokenizer, seed=0, decoder=decoder)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trajs = rollout.run(model, tokenizer, sim, people, roll_cfg, decoder=decoder)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    generated = sum(d.generated_tokens for d in made)
    prefill_s, decode_s = sum(d.prefill_s for d in made), sum(d.decode_s for d in made)
    result = {"method": method, "wall_s": round(wall, 2), "generated_tokens": generated,
              "tok_s": round(generated / wall, 1), "prefill_tokens": sum(d.prefill_tokens for d in made),
              "decode_steps": sum(d.decode_steps for d in made), "turns": sum(t.n_turns for t in trajs),
              # where the wall time went: the decoders' prefill and decode, and the rest (simulator
              # appraisal, Python bookkeeping); generate() cannot split its prefill off its decode
              "prefill_s": round(prefill_s, 2), "decode_s": round(decode_s, 2),
              "other_s": round(wall - prefill_s - decode_s, 2),
              "dialogue_hash": hashlib.sha1(json.dumps([t.ids for t in trajs]).encode()).hexdigest()[:12]}
    if cuda:
        result["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        name = torch.cuda.get_device_name()
        peak = next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)
        if peak and decode_s > 0:   # decode MBU: bytes a decode step must read (weights + KV) / decode time
            moved = result["decode_steps"] * weight_bytes(model) + sum(d.kv_slots_read for d in made) * kvbatch.kv_bytes_per_row(model, 1)
            result["decode_mbu"] = round(moved / decode_s / peak, 3)
        result["device"] = name
    else:
        result["peak_mem_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
        result["device"] = f"cpu x{torch.get_num_threads()}"
    return result


def weight_bytes(model):
    """Bytes of the weights one forward reads (4-bit parameters count their packed size)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def write_model(arch, path):
    """A random-weight model of a named architecture with the embedded tokenizer, saved as a Hugging
    Face folder: `python savpo.py model.name_or_path=PATH ...` then runs the whole GPU path with no
    download (the weights are random: for speed and memory, not for learning)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    lm.quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(lm.embedded_path())
    spec = dict(ARCHS[arch])
    model_config = AutoConfig.for_model(spec.pop("model_type"), **spec, tie_word_embeddings=False,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def child(args):
    tokenizer, model = load(args)
    kvbatch.KVBatch(model, tokenizer.pad_token_id)  # import-time warm-up is not part of any timing
    warmup_s = None
    if args.one == "kv_compiled":   # an untimed run first compiles every shape the timed run meets
        t0 = time.perf_counter()
        run_one(args, args.one, tokenizer, model)
        warmup_s = round(time.perf_counter() - t0, 1)
    result = run_one(args, args.one, tokenizer, model)
    result["warmup_s"] = warmup_s
    print(json.dumps(result))


def spawn(args, method, dialogues, turns):
    cmd = [sys.executable, os.path.abspath(__file__), "--one", method, "--dialogues", str(dialogues),
           "--turns", str(turns), "--policy-tokens", str(args.policy_tokens), "--user-tokens",
           str(args.user_tokens), "--model", args.model, "--quantization", args.quantization, "--dtype", args.dtype]
    if args.arch:
        cmd += ["--arch", args.arch]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench child '{method}' failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows):
    head = f"{'method':18s} {'dialogues':>9s} {'turns':>5s} {'wall s':>8s} {'gen tok':>8s} {'tok/s':>7s} " \
           f"{'prefill tok':>11s} {'peak GB':>8s} {'same dialogues':>14s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['method']:18s} {r['dialogues']:9d} {r['turns_cfg']:5d} {r['wall_s']:8.1f} {r['generated_tokens']:8d} "
              f"{r['tok_s']:7.1f} {r['prefill_tokens']:11d} {r['peak_mem_gb']:8.2f} {str(r['same_as_kv']):>14s}")


# --------------------------------------------------------------------------- --env and --health

def equal_work_sim_cfg(cfg, turns, **extra):
    """Every call lasts `turns` agent turns (no hang-up, no rejection): equal work for every way of playing it."""
    return {**cfg["simulator"], "appraiser": "lexical", "utterance": "template", "max_turns": turns, "temperature": 0.0,
            "rules": {**cfg["simulator"]["rules"], "patience": 10 ** 6, "reject_threshold": -1.0}, **extra}


def chat_messages(obs_system, transcript):
    """The agent's view as chat messages: its system block, then the callee as `user` and itself as `assistant`."""
    return [{"role": "system", "content": obs_system}] + [
        {"role": "user" if who == "callee" else "assistant", "content": text} for who, text in transcript]


@torch.no_grad()
def generate_turns(model, tokenizer, conversations, max_new_tokens):
    """One greedy agent turn for each conversation (chat messages), in one left-padded `model.generate` call."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                         top_k=None, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, batch["input_ids"].shape[1]:]]


def bench_env(args):
    """Calls/s of the native rollout, CallEnv (one call at a time) and CallBatch on the same personas."""
    cfg = config.load()
    tokenizer, model = lm.load_model({**cfg["model"], "name_or_path": args.model})
    people = P.sample_many(cfg["personas"]["domains"], args.dialogues, seed=0)
    sim_cfg = equal_work_sim_cfg(cfg, args.turns)
    run_cfg = {**cfg, "simulator": sim_cfg}
    rows = {}
    generate_turns(model, tokenizer, [chat_messages("warm-up", [("callee", "Hello?")])], 2)   # not timed

    t0 = time.perf_counter()
    trajs = rollout.run(model, tokenizer, S.CognitiveUserSimulator(sim_cfg, seed=0), people,
                        {**cfg["rollout"], "temperature": 0.0, "max_new_tokens": args.policy_tokens}, seed=0)
    rows["native"] = {"wall_s": time.perf_counter() - t0, "env_s": None, "decisions": [t.decision for t in trajs]}

    call, env_s, decisions = callenv.CallEnv(run_cfg), 0.0, []
    t0 = time.perf_counter()
    for p in people:                                   # the Gymnasium way: one call after another
        t1 = time.perf_counter()
        obs, info = call.reset(seed=0, options={"persona": p})
        env_s += time.perf_counter() - t1
        transcript, over = [("callee", obs["line"])], False
        while not over:
            turn = generate_turns(model, tokenizer, [chat_messages(obs["system"], transcript)], args.policy_tokens)[0]
            t1 = time.perf_counter()
            obs, reward, terminated, truncated, info = call.step(turn)
            env_s += time.perf_counter() - t1
            transcript += [("agent", turn), ("callee", obs["line"])]
            over = terminated or truncated
        decisions.append(info["decision"])
    rows["callenv"] = {"wall_s": time.perf_counter() - t0, "env_s": env_s, "decisions": decisions}

    batch, env_s = callenv.CallBatch(run_cfg), 0.0
    t0 = time.perf_counter()
    obs, infos = batch.reset(people, seed=0)
    transcripts, final = [[("callee", o["line"])] for o in obs], list(infos)
    systems = [o["system"] for o in obs]
    while not all(batch.over):
        live = [i for i, over in enumerate(batch.over) if not over]
        turns = [""] * len(people)
        for i, turn in zip(live, generate_turns(model, tokenizer, [chat_messages(systems[i], transcripts[i]) for i in live],
                                                args.policy_tokens)):
            turns[i] = turn
        t1 = time.perf_counter()
        obs, _, _, _, infos = batch.step(turns)
        env_s += time.perf_counter() - t1
        for i in live:
            transcripts[i] += [("agent", turns[i]), ("callee", obs[i]["line"])]
            final[i] = infos[i]
    rows["callbatch"] = {"wall_s": time.perf_counter() - t0, "env_s": env_s, "decisions": [f["decision"] for f in final]}

    device = f"cpu x{torch.get_num_threads()}" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"calls/s, {device}, {args.dialogues} calls x {args.turns} turns, greedy <= {args.policy_tokens} tokens a turn, "
          f"bank lines, lexical appraiser")
    print(f"{'way':10s} {'wall s':>8s} {'calls/s':>8s} {'in env s':>9s}")
    summary = {"mode": "env", "dialogues": args.dialogues, "turns": args.turns, "device": device, "model": args.model}
    for name, r in rows.items():
        r["calls_s"] = args.dialogues / r["wall_s"]
        env_txt = "-" if r["env_s"] is None else f"{r['env_s']:.2f}"
        print(f"{name:10s} {r['wall_s']:8.1f} {r['calls_s']:8.3f} {env_txt:>9s}")
        summary[f"{name}_calls_s"] = round(r["calls_s"], 4)
        summary[f"{name}_wall_s"] = round(r["wall_s"], 2)
        if r["env_s"] is not None:
            summary[f"{name}_env_s"] = round(r["env_s"], 3)
    summary["callenv_same_decisions_as_native"] = rows["callenv"]["decisions"] == rows["native"]["decisions"]
    summary["callbatch_same_decisions_as_callenv"] = rows["callbatch"]["decisions"] == rows["callenv"]["decisions"]
    print(json.dumps(summary))


def bench_health(args):
    """The simulator's health counts with the callee's lines from the in-process model and from the same model
    served (`transformers serve` on 127.0.0.1, or --endpoint): the same personas, policy and seeds."""
    cfg = config.load()
    # the model as published on both paths (the server has no warm start to fold in): like for like
    tokenizer, model = lm.load_model({**cfg["model"], "name_or_path": args.model, "warm_start": ""})
    people = P.sample_many(cfg["personas"]["domains"], args.dialogues, seed=0)
    roll_cfg = {**cfg["rollout"], "temperature": 0.0, "max_new_tokens": args.policy_tokens}
    base = {**cfg["simulator"], "appraiser": "lexical", "utterance": "llm", "max_turns": args.turns,
            "max_new_tokens": args.user_tokens, "temperature": 0.0}

    def play(sim_cfg):
        sim = S.CognitiveUserSimulator(sim_cfg, model, tokenizer, seed=0)
        t0 = time.perf_counter()
        trajs = rollout.run(model, tokenizer, sim, people, roll_cfg, seed=0)
        return {"wall_s": round(time.perf_counter() - t0, 2), "calls": len(trajs), "health": dict(sim.stats),
                "decisions": [t.decision for t in trajs]}

    results = {"in_process": play(base)}
    if args.endpoint:
        results["served"] = play({**base, "model": args.endpoint, "endpoint_model": args.endpoint_model or args.model})
    else:
        model_dir = lm.embedded_path() if args.model == lm.EMBEDDED else args.model
        with E.LocalServer(model_dir) as url:
            results["served"] = play({**base, "model": url, "endpoint_model": model_dir, "endpoint_timeout": 600.0})
    keys = [k for k in results["in_process"]["health"] if k != "generated_tokens"] + ["generated_tokens"]
    print(f"simulator health, {args.dialogues} calls x {args.turns} turns, <= {args.user_tokens} tokens a callee line, greedy")
    print(f"{'count':22s} {'in-process':>11s} {'served':>8s}")
    for k in keys:
        print(f"{k:22s} {results['in_process']['health'][k]:11d} {results['served']['health'][k]:8d}")
    print(f"{'wall s':22s} {results['in_process']['wall_s']:11.1f} {results['served']['wall_s']:8.1f}")
    print(json.dumps({"mode": "health", "dialogues": args.dialogues, "turns": args.turns, "user_tokens": args.user_tokens,
                      **{name: {k: r[k] for k in ("wall_s", "calls", "health")} for name, r in results.items()},
                      "same_decisions": results["in_process"]["decisions"] == results["served"]["decisions"]}))


# --------------------------------------------------------------------------- --step

STEP_BEFORE = ("model.dtype=float32", "train.personas_per_step=2", "train.group_size=4",   # the default until 2026-12-02
               "train.minibatches=1")


def step_child(args):
    """Time `args.steps` training steps of savpo.Trainer with the overrides `args.step_one` (a JSON list)."""
    import tempfile
    import savpo
    import warmstart
    overrides = json.loads(args.step_one)
    with tempfile.TemporaryDirectory() as out:
        cfg = warmstart.resolve(config.load(None, [*overrides, f"out_dir={out}", f"train.steps={args.steps}"]))
        trainer = savpo.Trainer(cfg, log=lambda *a: None)
        aopsd, steps = cfg["aopsd"], []
        for step in range(args.steps):
            t0 = time.perf_counter()
            trajs, rollout_s, _ = trainer.collect(step)
            _, per_turn = trainer.advantages(trajs)
            t1 = time.perf_counter()
            stats = trainer.update(trajs, per_turn, step)
            update_s = time.perf_counter() - t1
            privileged = [len(rollout.teacher_view(t, rollout.note_ids(trainer.tokenizer, t.persona, aopsd["note"]),
                                                   aopsd["placement"])[0]) for t in trajs]
            steps.append({"dialogues": len(trajs), "step_s": time.perf_counter() - t0, "rollout_s": rollout_s,
                          "teacher_s": stats["teacher_s"], "student_s": update_s - stats["teacher_s"],
                          "student_tokens": sum(len(t.ids) for t in trajs), "privileged_tokens": sum(privileged),
                          "agent_tokens": sum(sum(t.agent_mask) for t in trajs), "won": sum(t.reward > 0 for t in trajs)})
    total = {k: round(sum(s[k] for s in steps), 1) for k in steps[0]}
    total.update(overrides=overrides, steps=args.steps, dtype=str(next(trainer.model.parameters()).dtype).split(".")[-1],
                 dialogues_per_min=round(60 * total["dialogues"] / total["step_s"], 2), threads=torch.get_num_threads())
    print(json.dumps(total))


def bench_step(args):
    now = args.step_overrides if args.step_overrides is not None else []
    rows = {}
    for name, overrides in (("before", [*args.step_common, *STEP_BEFORE]), ("now", [*args.step_common, *now])):
        print(f"{name}: {args.steps} training steps, overrides {' '.join(overrides) or '(config.yaml as shipped)'} ...",
              file=sys.stderr, flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--step-one", json.dumps(overrides), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"bench step '{name}' failed:\n{out.stderr[-2000:]}")
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    head = f"{'setting':8s} {'dtype':9s} {'calls':>5s} {'step s':>7s} {'rollout':>8s} {'teacher':>8s} {'student':>8s} " \
           f"{'calls/min':>9s} {'tokens student / privileged / agent':>36s}"
    print(f"\nSAVPO training steps from the shipped warm start, cpu x{rows['now']['threads']} ({args.steps} steps each)")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        tokens = f"{r['student_tokens']:.0f} / {r['privileged_tokens']:.0f} / {r['agent_tokens']:.0f}"
        print(f"{name:8s} {r['dtype']:9s} {r['dialogues']:5.0f} {r['step_s']:7.1f} {r['rollout_s']:8.1f} {r['teacher_s']:8.1f} "
              f"{r['student_s']:8.1f} {r['dialogues_per_min']:9.2f} {tokens:>36s}")
    summary = {"mode": "step", **{f"{name}_{k}": v for name, r in rows.items() for k, v in r.items()},
               "speedup_dialogues_per_min": round(rows["now"]["dialogues_per_min"] / rows["before"]["dialogues_per_min"], 2)}
    print(json.dumps(summary))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dialogues", type=config.positive_int, default=16)
    parser.add_argument("--turns", type=config.positive_int, default=6)
    parser.add_argument("--policy-tokens", type=config.positive_int, default=32, help="max new tokens per agent turn")
    parser.add_argument("--user-tokens", type=config.positive_int, default=24, help="max new tokens per user line")
    parser.add_argument("--model", default=lm.EMBEDDED)
    parser.add_argument("--arch", choices=sorted(ARCHS), help="random-init model of this architecture")
    parser.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the models' dtype (auto: lm.pick_dtype; float32 for identical dialogues across paths)")
    parser.add_argument("--methods", default=None, help="default kv,kv_compiled,generate_batched,generate_single "
                        "(+ generate_static on CUDA: a static compiled cache, the strongest plain baseline)")
    parser.add_argument("--write-model", metavar="DIR", help="with --arch: write a random-weight model folder and exit")
    parser.add_argument("--sweep", action="store_true", help="also sweep batch size x turns (kv, generate_batched)")
    parser.add_argument("--env", action="store_true", help="calls/s: CallEnv and CallBatch (env.py) vs the native rollout")
    parser.add_argument("--health", action="store_true", help="simulator health counts: in-process vs served lines")
    parser.add_argument("--endpoint", help="--health: an OpenAI-compatible base URL to use instead of starting "
                        "`transformers serve` here")
    parser.add_argument("--endpoint-model", help="--health with --endpoint: the model name it serves")
    parser.add_argument("--step", action="store_true", help="training dialogues per minute: today's default step vs "
                        "the one before it (float32, 8 calls a step)")
    parser.add_argument("--steps", type=config.positive_int, default=2, help="--step: training steps per setting")
    parser.add_argument("--step-overrides", nargs="*", help="--step: key=value settings for 'now' instead of config.yaml's")
    parser.add_argument("--step-common", nargs="*", default=[], help="--step: key=value settings for both (e.g. another model)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--step-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return child(args)
    if args.step_one is not None:
        return step_child(args)
    if args.step:
        return bench_step(args)
    if args.env:
        return bench_env(args)
    if args.health:
        return bench_health(args)
    if args.write_model:
        if not args.arch:
            raise SystemExit("--write-model needs --arch (one of: " + ", ".join(sorted(ARCHS)) + ").")
        print(f"wrote a random-weight {args.arch} with the embedded tokenizer to {write_model(args.arch, args.write_model)}")
        return
    args.methods = args.methods or "kv,kv_compiled,generate_batched,generate_single" + (",generate_static" if torch.cuda.is_available() else "")
    grid = [(args.dialogues, args.turns, m) for m in args.methods.split(",")]
    if args.sweep:
        grid += [(d, t, m) for d in (4, 32) for t in (3, 6) for m in ("kv", "generate_batched")]
    rows = []
    for k, (dialogues, turns, method) in enumerate(grid):   # each run takes minutes on a CPU: say which is going
        print(f"[{k + 1}/{len(grid)}] {method}, {dialogues} dialogues x {turns} turns ...", file=sys.stderr, flush=True)
        r = spawn(args, method, dialogues, turns)
        r.update(dialogues=dialogues, turns_cfg=turns)
        rows.append(r)
        print(f"  {method:17s} {dialogues:3d} dialogues x {turns} turns: {r['tok_s']:.1f} tok/s", file=sys.stderr)
    for r in rows:
        kv = next(x for x in rows if x["method"] == "kv" and x["dialogues"] == r["dialogues"]
                  and x["turns_cfg"] == r["turns_cfg"])
        r["same_as_kv"] = r["dialogue_hash"] == kv["dialogue_hash"]
    print(f"\nrollout throughput, {rows[0]['device']}, model {args.arch or args.model} ({args.quantization}), "
          f"greedy, <= {args.policy_tokens} agent / {args.user_tokens} user tokens per turn")
    table(rows)
    main_rows = {r["method"]: r for r in rows[:len(args.methods.split(","))]}
    summary = {"dialogues": args.dialogues, "turns": args.turns, "device": rows[0]["device"],
               "model": args.arch or args.model, "quantization": args.quantization}
    for m, r in main_rows.items():
        summary[f"{m}_tok_s"] = r["tok_s"]
        summary[f"{m}_peak_gb"] = r["peak_mem_gb"]
        summary[f"{m}_split_s"] = {k: r[k] for k in ("prefill_s", "decode_s", "other_s")}
        if r.get("warmup_s") is not None:
            summary[f"{m}_warmup_s"] = r["warmup_s"]
        if "decode_mbu" in r:
            summary[f"{m}_decode_mbu"] = r["decode_mbu"]
    if "kv" in main_rows:
        for m in main_rows:
            if m != "kv":
                summary[f"speedup_vs_{m}"] = round(main_rows["kv"]["tok_s"] / main_rows[m]["tok_s"], 2)
        summary["identical_dialogues"] = all(r["same_as_kv"] for r in main_rows.values())
    if "kv_compiled" in main_rows:
        for m in main_rows:
            if m.startswith("generate"):
                summary[f"kv_compiled_speedup_vs_{m}"] = round(main_rows["kv_compiled"]["tok_s"] / main_rows[m]["tok_s"], 2)
    if args.sweep:
        summary["sweep"] = [{k: r[k] for k in ("method", "dialogues", "turns_cfg", "tok_s")} for r in rows]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
