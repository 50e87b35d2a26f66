"""The comparison: SAVPO against GRPO and its own ablations, trained over several seeds and evaluated on
the same held-out personas with paired 95% intervals.

    python compare.py --seeds 0,1,2 --personas 24 --n 2 train.steps=4 train.personas_per_step=2

Every preset (`algo`: grpo, savpo, distill, refine) is trained for every seed at the same rollout budget
(savpo.py's `Trainer`; a finished run is reused, a killed one resumed), then the base policy, the base
policy given the privileged view (the pilot) and every adapter play the same held-out personas with the
same sampling seed (eval.py). Writes OUT/compare.json, compare.md (one table: each policy's means with
95% bootstrap intervals over personas -- an algorithm's seeds averaged per persona first -- and its
paired difference from the base policy, then SAVPO minus each baseline) and compare.png; every policy's
calls go to OUT/samples_NAME.jsonl for view.py.
"""

import argparse
import os
import shutil

import checkpoint
import config
import eval as evaluation
import lm
import personas as P
import runfiles
import simulator as S
import warmstart
from eval import METRICS, fmt, intervals, paired_difference
from savpo import Trainer

ALGOS = ("grpo", "savpo", "distill", "refine")
COMPARE_PAIRS = (("savpo", "grpo"), ("savpo", "refine"), ("savpo", "distill"), ("refine", "grpo"))


def preset_overrides(overrides, algo):
    """The comparison's shared overrides minus those of keys the preset defines: `stpr.mode=direction` sets
    SAVPO's STPR for savpo and refine, while grpo keeps its outcome advantages."""
    return [o for o in overrides if config.parse_override(o)[0] not in config.PRESETS[algo]]


def compare(config_path, overrides, seeds, n_personas, n, out, algos=ALGOS):
    """Train every preset in `algos` for every seed (the config, with `algo` and `seed` set), then play
    every policy on the same held-out personas (module docstring). Returns {policy: intervals and paired
    difference from the base policy}."""
    cfg = config.load(config_path, overrides)
    os.makedirs(out, exist_ok=True)
    config.save(cfg, out)
    adapters = {}
    for algo in algos:
        for seed in seeds:
            run_dir = os.path.join(out, f"{algo}_seed{seed}")
            run_cfg = config.load(config_path, [*preset_overrides(overrides, algo), f"algo={algo}", f"seed={seed}",
                                                f"out_dir={run_dir}"])
            final = os.path.join(run_dir, "checkpoints", f"step_{run_cfg['train']['steps']:06d}", "adapter")
            if not os.path.exists(final):
                resume = os.path.exists(os.path.join(run_dir, "checkpoints", "latest"))
                if not resume:
                    shutil.rmtree(run_dir, ignore_errors=True)
                print(f"training {algo}, seed {seed} -> {run_dir}", flush=True)
                Trainer(run_cfg, resume).train()
            adapters[(algo, seed)] = final
    personas = evaluation.eval_personas(cfg, n_personas)
    tokenizer, model = lm.load_model(cfg["model"])
    for path in adapters.values():      # each checked (loaded, taken off again) before any policy is played
        lm.load_adapter(model, path, what="adapter").unload()
    sim_model = sim_tok = None
    if S.own_model(cfg["simulator"]["model"]):   # "" or an endpoint URL: none to load
        sim_tok, sim_model = lm.load_model({**cfg["model"], "name_or_path": cfg["simulator"]["model"], "warm_start": ""})
    tables = {}

    def play_table(name, privileged=None):
        tables[name], played = evaluation.scored_play(model, tokenizer, cfg, personas, n, cfg["seed"],
                                                      os.path.join(out, f"samples_{name.replace('/', '_')}.jsonl"),
                                                      privileged, sim_model, sim_tok, progress=f"eval {name}")
        print(f"  {name:26s} " + "  ".join(f"{m} {fmt(v)}" for m, v in played["intervals"].items()), flush=True)

    play_table("base")
    play_table(f"base+privileged({cfg['aopsd']['placement']})", cfg["aopsd"]["placement"])
    for (algo, seed), path in adapters.items():
        name = f"{algo}_seed{seed}"
        model = lm.load_adapter(model, path, name, what="adapter")
        model.set_adapter(name)
        play_table(name)
    rows = {name: tables[name] for name in list(tables)[:2]}
    for algo in algos:    # an algorithm's seeds averaged per persona: the persona stays the unit
        per_seed = [tables[f"{algo}_seed{seed}"] for seed in seeds]
        rows[algo] = {p: {m: sum(t[p][m] for t in per_seed) / len(per_seed) for m in METRICS} for p in per_seed[0]}
    result = {name: {"intervals": intervals(table),
                     "difference_vs_base": paired_difference(tables["base"], table) if name != "base" else None,
                     "per_seed_means": {s: {m: round(sum(r[m] for r in tables[f"{name}_seed{s}"].values())
                                                  / len(personas), 4) for m in METRICS} for s in seeds}
                     if name in algos else None} for name, table in rows.items()}
    # the method against its baseline and its own ablations, persona by persona (seeds averaged)
    pairs = {f"{a} - {b}": paired_difference(rows[b], rows[a]) for a, b in COMPARE_PAIRS if a in rows and b in rows}
    runfiles.write_json(os.path.join(out, "compare.json"), {   # per_persona: for any other paired difference
        "personas": len(personas), "samples": n, "seeds": list(seeds), "results": result, "pairs": pairs,
        "per_persona": tables}, indent=1)
    lines = [f"# {len(personas)} held-out personas x {n} samples; trained presets averaged over seeds "
             f"{', '.join(map(str, seeds))} per persona; 95% bootstrap intervals over personas", "",
             "| policy | " + " | ".join(METRICS) + " | reveal minus base | resolve minus base | success minus base |",
             "|---|" + "---|" * (len(METRICS) + 3)]
    for name, r in result.items():
        d = r["difference_vs_base"]
        lines.append(f"| {name} | " + " | ".join(fmt(r["intervals"][m]) for m in METRICS) + " | "
                     + (" | ".join(fmt(d[m]) for m in ("reveal", "resolve", "success")) if d else "- | - | -") + " |")
    lines += ["", "Paired differences (an interval that holds 0 is no measurable difference):", "",
              "| difference | success | resolve | reveal | misinformation |", "|---|---|---|---|---|"]
    for name, d in pairs.items():
        lines.append(f"| {name} | " + " | ".join(fmt(d[m]) if m in d else "-" for m in
                                                ("success", "resolve", "reveal", "misinformation")) + " |")
    runfiles.write_text(os.path.join(out, "compare.md"), "\n".join(lines) + "\n")
    _compare_plot(result, os.path.join(out, "compare.png"))
    print("\n".join(lines))
    return result


def _compare_plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(result)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, metric in zip(axes, ("success", "reveal", "resolve")):
        ci = [result[n]["intervals"][metric] for n in names]
        ax.bar(range(len(names)), [c[0] for c in ci], yerr=[[c[0] - c[1] for c in ci], [c[2] - c[0] for c in ci]],
               capsize=3, color=["gray", "silver"] + ["tab:blue"] * (len(names) - 2))
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7, ha="right")
        ax.set_title(f"{metric} (95% CI over personas)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train every preset over seeds and compare them with the base "
                                     "policy and the pilot on held-out personas.")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    parser.add_argument("--personas", type=config.positive_int, default=64, help="held-out personas")
    parser.add_argument("--n", type=config.positive_int, default=4, help="sampled dialogues per persona")
    parser.add_argument("--out", default="runs/compare", help="output folder")
    parser.add_argument("--config", default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value, shared by every preset")
    args = parser.parse_intermixed_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. --seeds 0,1,2.") from None
    overrides = list(args.overrides)
    try:
        cfg = config.load(args.config, overrides)
        if cfg["model"]["warm_start"]:     # every preset starts from the same warm start, checked once
            overrides.append(f"model.warm_start={warmstart.resolve(cfg)['model']['warm_start']}")
        return compare(args.config, overrides, seeds, args.personas, args.n, args.out)
    except (config.ConfigError, lm.ModelError, P.DomainError, checkpoint.CheckpointError, ValueError) as e:
        raise SystemExit(f"compare: {e}")


if __name__ == "__main__":
    main()
