"""Evaluate policies against the Cognitive User Simulator on held-out personas.

    python eval.py                                             # the base model
    python eval.py --adapter runs/default/checkpoints/step_000007/adapter
    python eval.py --pilot --adapter RUN_A/.../adapter --adapter RUN_B/.../adapter
    python eval.py --appraiser llm                             # cross-simulator: another appraiser
    python eval.py --simulator-model PATH_OR_ID                # cross-simulator: another simulator model

Every policy plays `--n` sampled dialogues with each held-out persona (config `personas.eval_seed`,
disjoint from the training personas, which is checked). Output in `--out` (default runs/eval):
metrics.json, report.md (tables), success.png, pass_at_k.png, strata.png, willingness.png.

Metrics, overall and per domain and per stratum, with counts:
- outcome: success rate (accept), pass@k (unbiased estimator over the n samples of a persona),
  average agent turns to success, hang-up, reject and turn-budget (timeout/overflow) rates;
- proactivity: share of hidden concerns revealed and resolved, the agent turn (1-based) of the first
  probe of each concern, mean willingness change per agent turn;
- privilege leak rate: share of agent turns that *name* a concern the user has not revealed yet --
  a distinctive 4-word phrase of the concern's statement, or "you're worried / I know you ... <cue>"
  -- which a conversation-only policy cannot know (a plain probing question is not a leak);
- simulator health: parse failures, role inversions, empty and inconsistent lines, truncations.

The pilot study (`--pilot`) is the paper's first experiment in miniature: the base policy with the
conversation-only view, the *same* base policy given the privileged view (hidden concerns in its
prompt, `aopsd.placement`), and any trained adapters, compared by pass@k for k = 1..n. The report
says plainly whether the privileged policy beats the base one here.

SAVPO against GRPO and its ablations over several seeds trains every preset first: compare.py.
"""

import argparse
import math
import os
import re
import sys

import torch

import config
import kvbatch
import lm
import personas as P
import rollout
import runfiles
import simulator as S

STOPWORDS = set("i you your my me we our the a an and or to of in on for is are be it that this with "
                "at as so but if do don't not no have has can will would just about from".split())
LEAK_PATTERN = re.compile(r"\b(you'?re|you are|you seem|i know you|i understand you|you mentioned|your "
                          r"(worry|concern|fear))\b[^.?!]{0,60}", re.I)


# --------------------------------------------------------------------------- metrics

def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021): the chance that at least one of k samples drawn without
    replacement from n, of which c succeeded, succeeds. 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _grams(text, n=4):
    words = re.findall(r"[a-z']+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)
            if not all(w in STOPWORDS for w in words[i:i + n])}


def leaked_concerns(agent_text, persona, concern_status):
    """Concerns the agent *names* while they are still hidden: a distinctive 4-word phrase of the
    concern's statement, or a 'you're worried / I know you ...' phrase followed by one of its cues."""
    low = agent_text.lower()
    asserted = " ".join(m.group(0) for m in LEAK_PATTERN.finditer(low))
    leaks = []
    for c in persona.concerns:
        if concern_status.get(c.id) != "hidden":
            continue
        if _grams(c.statement) & _grams(low) or (asserted and any(cue in asserted for cue in c.probe_cues)):
            leaks.append(c.id)
    return leaks


def dialogue_facts(traj):
    """Per-dialogue numbers every aggregate is built from."""
    agent_texts = [m["content"] for m in traj.messages if m["role"] == "assistant"]
    status = {c.id: "hidden" for c in traj.persona.concerns}
    first_probe, leak_turns, false_turns, incoherent_turns = {}, 0, 0, 0
    for k, (text, state) in enumerate(zip(agent_texts, traj.states)):
        leak_turns += bool(leaked_concerns(text, traj.persona, status))
        false_turns += bool(state["events"].get("false_claims"))      # older files have no such event: 0
        incoherent_turns += bool(set(state["events"].get("incoherent", ())) - {"ignores_worry"})
        for cid in state["events"]["probed"]:
            first_probe.setdefault(cid, k + 1)
        status = state["concern_status"]
    final = traj.states[-1]["concern_status"] if traj.states else status
    return {"success": traj.reward, "decision": traj.decision, "turns": traj.n_turns,
            "concerns": len(status), "revealed": sum(v != "hidden" for v in final.values()),
            "resolved": sum(v == "resolved" for v in final.values()),
            "first_probe": list(first_probe.values()),
            "dw": [s["delta_willingness"] for s in traj.states], "leak_turns": leak_turns,
            "false_claim_turns": false_turns, "incoherent_turns": incoherent_turns,
            "willingness": [traj.persona.willingness] + [s["willingness"] for s in traj.states]}


def aggregate(trajs, ks=None):
    """Metrics of a set of trajectories (several samples per persona allowed)."""
    facts = [dialogue_facts(t) for t in trajs]
    n = len(facts)
    if n == 0:
        return {"dialogues": 0}
    by_persona = {}
    for t, f in zip(trajs, facts):
        by_persona.setdefault(t.persona.persona_id, []).append(f["success"])
    samples = min(len(v) for v in by_persona.values())
    ks = ks or list(range(1, samples + 1))
    wins = [f for f in facts if f["success"]]
    turns = sum(f["turns"] for f in facts)
    concerns = sum(f["concerns"] for f in facts) or 1
    probes = [x for f in facts for x in f["first_probe"]]
    dws = [x for f in facts for x in f["dw"]]
    rate = lambda *ds: round(sum(f["decision"] in ds for f in facts) / n, 4)
    return {
        "dialogues": n, "personas": len(by_persona),
        "success_rate": round(len(wins) / n, 4),
        "pass_at_k": {k: round(sum(pass_at_k(len(v), int(sum(v)), k) for v in by_persona.values())
                               / len(by_persona), 4) for k in ks if k <= samples},
        "turns_to_success": round(sum(f["turns"] for f in wins) / len(wins), 2) if wins else None,
        "hangup_rate": rate("hangup"), "reject_rate": rate("reject"), "timeout_rate": rate("timeout", "overflow"),
        "reveal_rate": round(sum(f["revealed"] for f in facts) / concerns, 4),
        "resolve_rate": round(sum(f["resolved"] for f in facts) / concerns, 4),
        "first_probe_turn": round(sum(probes) / len(probes), 2) if probes else None,
        "willingness_gain_per_turn": round(sum(dws) / len(dws), 4) if dws else 0.0,
        "leak_rate": round(sum(f["leak_turns"] for f in facts) / max(1, turns), 4),
        # false claims per agent turn (the simulator checks every claim against the bank's facts), and
        # turns that speak for the callee or repeat themselves
        "misinformation_rate": round(sum(f["false_claim_turns"] for f in facts) / max(1, turns), 4),
        "incoherent_rate": round(sum(f["incoherent_turns"] for f in facts) / max(1, turns), 4),
    }


def breakdown(trajs):
    """Overall, per domain and per stratum."""
    out = {"overall": aggregate(trajs), "domain": {}, "stratum": {}}
    for key, attr in (("domain", "domain"), ("stratum", "stratum")):
        groups = {}
        for t in trajs:
            groups.setdefault(getattr(t.persona, attr), []).append(t)
        out[key] = {g: aggregate(ts) for g, ts in sorted(groups.items())}
    return out


def summarize(trajs):
    """Success rate, willingness gain and concern rates of one training step's trajectories: the line
    each trainer logs per step (savpo.py, trl_savpo.py)."""
    n = max(1, len(trajs))
    concerns = sum(len(t.persona.concerns) for t in trajs) or 1
    final = [t.states[-1] if t.states else None for t in trajs]
    gain = [f["willingness"] - t.persona.willingness for t, f in zip(trajs, final) if f]
    status = [v for f in final if f for v in f["concern_status"].values()]
    return {"success_rate": round(sum(t.reward for t in trajs) / n, 4),
            "willingness_gain": round(sum(gain) / max(1, len(gain)), 4),
            "reveal_rate": round(sum(s != "hidden" for s in status) / concerns, 4),
            "resolve_rate": round(sum(s == "resolved" for s in status) / concerns, 4),
            "turns": round(sum(t.n_turns for t in trajs) / n, 2),
            "misinformation_rate": round(sum(bool(s["events"].get("false_claims")) for t in trajs for s in t.states)
                                         / max(1, sum(t.n_turns for t in trajs)), 4),
            "incoherent_rate": round(sum(bool(set(s["events"].get("incoherent", ())) - {"ignores_worry"})
                                         for t in trajs for s in t.states) / max(1, sum(t.n_turns for t in trajs)), 4),
            "agent_tokens": sum(sum(t.agent_mask) for t in trajs)}



# --------------------------------------------------------------------------- statistics over personas

METRICS = ("success", "pass@k", "reveal", "resolve", "misinformation")


def per_persona(trajs):
    """{persona_id: {metric: value}}: each held-out persona's own rates over its n samples --
    success rate, unbiased pass@n (k = n: did any sample succeed), share of its concerns revealed and
    resolved, false claims per agent turn (misinformation). The persona is the unit of the intervals: its
    samples are not independent draws."""
    groups = {}
    for t in trajs:
        groups.setdefault(t.persona.persona_id, []).append(dialogue_facts(t))
    out = {}
    for pid, facts in groups.items():
        n, wins = len(facts), int(sum(f["success"] for f in facts))
        concerns = sum(f["concerns"] for f in facts) or 1
        out[pid] = {"success": wins / n, "pass@k": pass_at_k(n, wins, n),
                    "reveal": sum(f["revealed"] for f in facts) / concerns,
                    "resolve": sum(f["resolved"] for f in facts) / concerns,
                    "misinformation": sum(f["false_claim_turns"] for f in facts) / max(1, sum(f["turns"] for f in facts))}
    return out


def bootstrap(values, n_boot=2000, seed=0):
    """[mean, low, high]: the mean of `values` (one number per persona) and its 95% percentile
    bootstrap interval, resampling personas with replacement. [0.1, 0.3] -> [0.2, 0.1, 0.3]."""
    import random
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return [round(sum(values) / n, 4), round(means[int(0.025 * n_boot)], 4), round(means[int(0.975 * n_boot) - 1], 4)]


def intervals(table):
    """{metric: [mean, low, high]} over the personas of a per_persona table."""
    return {m: bootstrap([row[m] for row in table.values()]) for m in _metrics(table)}


def paired_difference(table_a, table_b):
    """{metric: [mean, low, high]} of b - a, persona by persona (the same personas and sampling seeds):
    pairing removes the persona-to-persona spread from the comparison. An interval that holds 0 is
    "no measurable difference"."""
    common = sorted(set(table_a) & set(table_b))
    return {m: bootstrap([table_b[p][m] - table_a[p][m] for p in common]) for m in _metrics(table_a, table_b)}


def _metrics(*tables):
    """The METRICS every row of the tables holds (a table saved before a metric existed lacks it)."""
    return [m for m in METRICS if all(m in row for table in tables for row in table.values())]


def fmt(ci):
    return f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"


# --------------------------------------------------------------------------- running policies

@torch.no_grad()
def play(model, tokenizer, cfg, persona_list, n, seed, privileged=None, sim_model=None, sim_tokenizer=None,
         progress=False, note=None):
    """n sampled dialogues per persona; returns (trajectories, simulator health counters). `progress`: a
    label for a bar on stderr (turns played, calls over, time left), or False."""
    was_training = model.training
    model.eval()
    sim = S.CognitiveUserSimulator(cfg["simulator"], sim_model or model, sim_tokenizer or tokenizer, seed=seed + 1,
                                   decoder=kvbatch.decoder_for(sim_model or model, cfg["rollout"]))
    trajs = rollout.run(model, tokenizer, sim, persona_list, cfg["rollout"], group_size=n, seed=seed + 7,
                        privileged=privileged, progress=progress, note=note or cfg["aopsd"]["note"])
    model.train(was_training)
    return trajs, dict(sim.stats)


def quick(model, tokenizer, cfg, persona_list, seed=0, group_size=1, sim_model=None, sim_tokenizer=None):
    """savpo.py's periodic evaluation: the overall metrics of the current policy, against the same
    simulator model as training (`simulator.model`)."""
    trajs, health = play(model, tokenizer, cfg, persona_list, group_size, seed, sim_model=sim_model,
                         sim_tokenizer=sim_tokenizer, progress="held-out eval")
    overall = aggregate(trajs)
    overall.pop("pass_at_k")
    return {**overall, "simulator_health": health}


def train_personas(cfg):
    """Every training persona of a run with config `cfg` (savpo.py's schedule)."""
    t, pc = cfg["train"], cfg["personas"]
    return [p for k in range(t["steps"]) for p in P.schedule(pc["domains"], t["personas_per_step"], pc["train_seed"], k,
                                                               pc["curriculum_steps"])]


def eval_personas(cfg, n=None):
    """Held-out personas, checked disjoint from the training personas of `cfg`."""
    train = train_personas(cfg)
    held = P.sample_many(cfg["personas"]["domains"], n or cfg["personas"]["eval_n"], cfg["personas"]["eval_seed"],
                         exclude_ids={p.persona_id for p in train})
    P.check_disjoint(train, held)
    return held


def write_samples(trajs, path):
    """Full dialogues, one JSON line each (Trajectory.to_dict): what view.py draws. Written whole, then
    renamed over an older file."""
    runfiles.write_jsonl(path, (t.to_dict() for t in trajs))


def scored_play(model, tokenizer, cfg, persona_list, n, seed, samples_path, privileged=None, sim_model=None,
                sim_tokenizer=None, progress=False, note=None, samples_every=1):
    """`play`, then what every held-out comparison keeps of it: the calls written to `samples_path` for
    view.py (every `samples_every`-th), the per-persona table (the unit of the paired differences) and
    the results (breakdown, simulator health, willingness by turn, 95% intervals). Returns (table, results)."""
    trajs, health = play(model, tokenizer, cfg, persona_list, n, seed, privileged, sim_model, sim_tokenizer,
                         progress=progress, note=note)
    write_samples(trajs[::samples_every], samples_path)
    table = per_persona(trajs)
    return table, {**breakdown(trajs), "simulator_health": health, "willingness_by_turn": willingness_by_turn(trajs),
                   "intervals": intervals(table)}


# --------------------------------------------------------------------------- report

def write_report(results, out_dir, title, plots=True):
    """metrics.json, report.md and (`plots`) the plots for {policy name: breakdown}, each written whole and
    then renamed over the old one."""
    os.makedirs(out_dir, exist_ok=True)
    runfiles.write_json(os.path.join(out_dir, "metrics.json"), results, indent=1, default=str)
    names = list(results)
    cols = ["success_rate", "hangup_rate", "reject_rate", "timeout_rate", "reveal_rate", "resolve_rate",
            "first_probe_turn", "willingness_gain_per_turn", "leak_rate", "misinformation_rate", "incoherent_rate"]
    lines = [f"# {title}", "", "| policy | dialogues | " + " | ".join(cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for name in names:
        o = results[name]["overall"]
        lines.append(f"| {name} | {o['dialogues']} | " + " | ".join(str(o[c]) for c in cols) + " |")
    if all("intervals" in results[n] for n in names):
        lines += ["", "Means and 95% bootstrap intervals over personas (pass@k at k = samples per persona):", "",
                  "| policy | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(fmt(results[name]["intervals"][m]) for m in METRICS) + " |")
        diffs = [n for n in names if "difference_vs_base" in results[n]]
        if diffs:
            lines += ["", "Difference from the base policy, persona by persona (same personas and seeds; an "
                      "interval holding 0 is no measurable difference):", "",
                      "| policy | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
            for name in diffs:
                lines.append(f"| {name} | " + " | ".join(fmt(results[name]["difference_vs_base"][m]) for m in METRICS) + " |")
    ks = sorted({int(k) for name in names for k in results[name]["overall"]["pass_at_k"]})
    lines += ["", "pass@k (unbiased, per persona, averaged):", "",
              "| policy | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name in names:
        pk = results[name]["overall"]["pass_at_k"]
        lines.append(f"| {name} | " + " | ".join(str(pk.get(k, pk.get(str(k), ""))) for k in ks) + " |")
    for part in ("domain", "stratum"):
        lines += ["", f"Success rate per {part} (dialogues):", "", "| policy | " +
                  " | ".join(sorted(results[names[0]][part])) + " |",
                  "|---|" + "---|" * len(results[names[0]][part])]
        for name in names:
            cells = [f"{v['success_rate']} ({v['dialogues']})" for _, v in sorted(results[name][part].items())]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Simulator health (counts): " + "; ".join(f"{n}: {results[n].get('simulator_health')}"
                                                            for n in names)]
    runfiles.write_text(os.path.join(out_dir, "report.md"), "\n".join(lines) + "\n")
    if plots:
        _plots(results, out_dir)
    return os.path.join(out_dir, "report.md")


def _plots(results, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(names, [results[n]["overall"]["success_rate"] for n in names], color="tab:blue")
    ax.bar(names, [results[n]["overall"]["reveal_rate"] for n in names], color="tab:orange", alpha=0.5,
           label="concerns revealed")
    ax.set_ylim(0, 1)
    ax.set_title("success rate (blue) and concerns revealed (orange)")
    ax.tick_params(axis="x", labelrotation=20, labelsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "success.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3))
    for n in names:
        pk = results[n]["overall"]["pass_at_k"]
        ks = sorted(int(k) for k in pk)
        ax.plot(ks, [pk.get(k, pk.get(str(k))) for k in ks], marker="o", label=n)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "pass_at_k.png"), dpi=110)
    plt.close(fig)
    strata = sorted(results[names[0]]["stratum"])
    fig, ax = plt.subplots(figsize=(max(6, len(strata) * 0.5), 3))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([x + i * width for x in range(len(strata))],
               [results[n]["stratum"].get(s, {}).get("reveal_rate", 0) for s in strata], width, label=n)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(strata))], strata, rotation=60, fontsize=6)
    ax.set_title("concerns revealed per stratum")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "strata.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3))
    for n in names:
        curve = results[n].get("willingness_by_turn", [])
        ax.plot(range(len(curve)), curve, marker="o", label=n)
    ax.set_xlabel("agent turn")
    ax.set_ylabel("mean willingness (live dialogues)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "willingness.png"), dpi=110)
    plt.close(fig)


def willingness_by_turn(trajs):
    """Mean willingness before turn 1, after turn 1, ... over the dialogues still running."""
    curves = [dialogue_facts(t)["willingness"] for t in trajs]
    longest = max(map(len, curves)) if curves else 0
    return [round(sum(c[k] for c in curves if len(c) > k) / sum(len(c) > k for c in curves), 3)
            for k in range(longest)]


def plot_curves(run_dir):
    """curves.png next to a run's metrics.jsonl: loss terms and rollout outcomes per step (a line that
    cannot be read, or a metric a line lacks, is left out: a plot never stops a run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [line.record for line in runfiles.jsonl_lines(os.path.join(run_dir, "metrics.jsonl"))
            if isinstance(line.record, dict) and isinstance(line.record.get("step"), int)]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for key in ("aopsd_kl", "pg_loss", "loss"):
        if all(key in r for r in rows):
            axes[0].plot(steps, [r[key] for r in rows], marker="o", label=key)
    axes[0].set_title("losses")
    for key in ("success_rate", "reveal_rate", "resolve_rate", "misinformation_rate"):
        if all(key in r for r in rows):       # runs logged before the fact check have no misinformation rate
            axes[1].plot(steps, [r[key] for r in rows], marker="o", label=key)
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].set_title("training rollouts")
    if all("willingness_gain" in r for r in rows):
        axes[2].plot(steps, [r["willingness_gain"] for r in rows], marker="o", color="tab:green")
    axes[2].axhline(0, color="gray", lw=0.5)
    axes[2].set_title("willingness gain per dialogue")
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(run_dir, "curves.png")
    with runfiles.atomic(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI

def _adapter_run_config(path):
    """The config.yaml of the run an adapter came from (RUN/checkpoints/step_N/adapter), if any."""
    run = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    cfg_path = os.path.join(run, "config.yaml")
    return config.load(cfg_path) if os.path.exists(cfg_path) else None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate policies against the Cognitive User Simulator.")
    parser.add_argument("--adapter", action="append", default=[], help="a saved LoRA adapter (repeatable)")
    parser.add_argument("--pilot", action="store_true", help="also the base policy given the privileged view")
    parser.add_argument("--notes", default=None, help="--pilot: the note styles to give it, comma-separated "
                        f"(default aopsd.note; any of {', '.join(P.NOTE_STYLES)})")
    parser.add_argument("--no-base", action="store_true", help="skip the base policy")
    parser.add_argument("--n", type=config.positive_int, default=4, help="sampled dialogues per persona (pass@k up to n)")
    parser.add_argument("--personas", type=config.positive_int, default=None,
                        help="held-out personas (default personas.eval_n)")
    parser.add_argument("--appraiser", choices=["lexical", "llm", "generative"], help="cross-simulator: appraiser")
    parser.add_argument("--simulator-model", help="cross-simulator: another model plays the user")
    parser.add_argument("--out", default="runs/eval", help="output folder")
    parser.add_argument("--config", default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = parser.parse_intermixed_args(argv)       # overrides may come before and after the flags
    notes = args.notes.split(",") if args.notes else []
    if [n for n in notes if n not in P.NOTE_STYLES]:
        raise SystemExit(f"--notes: unknown note style {[n for n in notes if n not in P.NOTE_STYLES][0]!r}; "
                         f"allowed: {', '.join(P.NOTE_STYLES)}.")
    try:
        cfg = config.load(args.config, args.overrides + ([f"simulator.appraiser={args.appraiser}"]
                                                          if args.appraiser else []))
        cfg = config.check_warm_start(cfg)
        notes = (notes or [cfg["aopsd"]["note"]]) if args.pilot else []
        personas = eval_personas(cfg, args.personas)
        for path in args.adapter:
            if not os.path.exists(os.path.join(path, "adapter_config.json")):
                raise lm.ModelError(f"--adapter {path}: no adapter_config.json there; pass a folder like "
                                    f"RUN/checkpoints/step_N/adapter.")
            run_cfg = _adapter_run_config(path)
            if run_cfg is not None:  # the adapter's own training personas must not be evaluated on
                P.check_disjoint(train_personas(run_cfg), personas)
                # an adapter trained on a warm-started base is played on that base, and so is the base policy
                warm = run_cfg["model"]["warm_start"]
                if warm != cfg["model"]["warm_start"]:
                    if any(_adapter_run_config(p)["model"]["warm_start"] != warm for p in args.adapter
                           if _adapter_run_config(p)):
                        raise SystemExit("--adapter: these adapters were trained on different warm starts "
                                         "(model.warm_start); evaluate them one warm start at a time.")
                    print(f"model.warm_start={warm or '(none)'}: the base the adapter {path} was trained on", file=sys.stderr)
                    cfg["model"]["warm_start"] = warm
        tokenizer, model = lm.load_model(cfg["model"])
        for path in args.adapter:   # each loaded onto the model and taken off again: a bad one stops here, before
            lm.load_adapter(model, path).unload()          # any policy is played (and nothing is written)
        sim_model = sim_tok = None
        sim_name = args.simulator_model or cfg["simulator"]["model"]
        if args.simulator_model and not S.own_model(args.simulator_model):
            raise config.ConfigError(f"--simulator-model names a model to load; give an endpoint as simulator.model="
                                     f"{args.simulator_model} simulator.endpoint_model=NAME instead.")
        if S.own_model(sim_name):    # "" or an endpoint URL: none to load
            sim_tok, sim_model = lm.load_model({**cfg["model"], "name_or_path": sim_name, "warm_start": ""})
    except (config.ConfigError, lm.ModelError, P.DomainError, ValueError) as e:
        raise SystemExit(f"eval: {e}")
    title = f"Evaluation: {len(personas)} held-out personas x {args.n} samples, appraiser " \
            f"{cfg['simulator']['appraiser']}, simulator model {sim_name or cfg['model']['name_or_path']}"
    seed = cfg["seed"]
    results = {}

    tables = {}

    def record(name, privileged=None, note=None):
        tables[name], results[name] = scored_play(
            model, tokenizer, cfg, personas, args.n, seed, os.path.join(args.out, f"samples_{name.replace('/', '_')}.jsonl"),
            privileged, sim_model, sim_tok, progress=f"eval {name}", note=note, samples_every=args.n)
        if name != "base" and "base" in tables:
            results[name]["difference_vs_base"] = paired_difference(tables["base"], tables[name])
        ci = results[name]["intervals"]
        print(f"{name:28s} success {fmt(ci['success'])}  pass@{args.n} {fmt(ci['pass@k'])}  "
              f"revealed {fmt(ci['reveal'])}  resolved {fmt(ci['resolve'])}  misinformation {fmt(ci['misinformation'])}  "
              f"leak {results[name]['overall']['leak_rate']:.3f}")
        if "difference_vs_base" in results[name]:
            print(f"{'':28s} minus base: revealed {fmt(results[name]['difference_vs_base']['reveal'])}  "
                  f"success {fmt(results[name]['difference_vs_base']['success'])}")
        write_report(results, args.out, title, plots=False)   # each policy's results on disk as soon as it is played

    os.makedirs(args.out, exist_ok=True)
    config.save(cfg, args.out)
    if not args.no_base:
        record("base")
    pilots = []
    for note in notes:
        pilots.append(f"base+privileged({note}, {cfg['aopsd']['placement']})")
        record(pilots[-1], privileged=cfg["aopsd"]["placement"], note=note)
    for i, path in enumerate(args.adapter):
        name = f"a{i}"
        model = lm.load_adapter(model, path, name)
        model.set_adapter(name)
        run_cfg = _adapter_run_config(path)
        run_name = os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path)))))
        record(f"{run_cfg['algo']}:{run_name}" if run_cfg else f"adapter{i}")
    report = write_report(results, args.out, title)
    for name in pilots if not args.no_base else []:
        d = results[name]["difference_vs_base"]
        holds = d["success"][1] > 0 and d["resolve"][1] > 0        # both intervals above zero
        verdict = (f"{'holds' if holds else 'does not hold'} for {name}: privileged minus base, success "
                   f"{fmt(d['success'])}, resolved {fmt(d['resolve'])} (it holds where both intervals exclude 0)")
        with open(report, "a") as f:
            f.write(f"\nPilot claim (concern-conditioning unlocks successes sampling alone does not): {verdict}.\n")
        print(f"pilot: the claim {verdict}")
    print(f"wrote {report} and plots in {args.out}")


if __name__ == "__main__":
    main()
