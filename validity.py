"""Is the simulator's reading of an agent turn right? Two measurements, each a command. Read later.

    python validity.py matrix [--personas 90] [--natural-lines FILE]   # scripted agents vs the rules
    python validity.py appraisers [--appraisers lexical,semantic,llm] [--labels FILE]   # P / R / F1

`matrix`: every scripted agent (scripted_agents.py) plays stratified personas of every domain; the
success rate of each is the table in docs/simulator.md. Agents that know the concerns and answer
truthfully must win; every cheap, passive or lying policy must not (the thresholds are tests).

`appraisers`: precision, recall and F1 of each appraiser per label on natural salesperson lines
labelled by hand (data/appraisal_labels.jsonl, held out: written independently of the exemplars;
thresholds were chosen on data/appraisal_dev.jsonl). probe / addresses / false_claim are counted over
(line, concern) pairs, open_probe / push / off_topic over lines.
"""

import argparse
import json
import os
import time

import config
import lm
import personas as P
import runfiles
import simulator as S
from scripted_agents import (INDEPENDENT_LINES, NATURAL_LINES, SCRIPTED_AGENTS, load_natural_lines,
                             play_scripted)

LABELS_PATH = os.path.join(P.DOMAIN_DIR, "..", "appraisal_labels.jsonl")


# --------------------------------------------------------------------------- the validity matrix

def validity_matrix(sim_cfg, n_per_domain=90, seed=0, domains=None, natural_lines=None, independent_lines=None,
                    agents=None):
    """{agent: {domain: success rate, ..., "all": success rate}} over n_per_domain stratified personas
    per domain (seed `seed`). Each agent speaks its own lines (`Agent.lines`): `natural_lines` (default
    the held-out data/natural_agents.yaml) or `independent_lines` (default the held-out
    data/natural_agents_independent.yaml). `agents`: names to play (default every one)."""
    domains = domains or P.list_domains()
    people = {d: P.sample(d, n_per_domain, seed) for d in domains}
    paths = {"bank": None, "natural": natural_lines or NATURAL_LINES, "independent": independent_lines or INDEPENDENT_LINES}
    table = {}
    for name, agent in SCRIPTED_AGENTS.items():
        if agents is not None and name not in agents:
            continue
        if agent.lines != "bank" and not all(d in load_natural_lines(paths[agent.lines]) for d in domains):
            continue     # a domain without natural lines (a new bank): the bank-worded agents only
        row, wins = {}, 0
        for d in domains:
            states = play_scripted(agent.policy, people[d], sim_cfg, seed, paths[agent.lines])
            row[d] = round(sum(s.decision == "accept" for s in states) / len(states), 3)
            wins += sum(s.decision == "accept" for s in states)
        row["all"] = round(wins / (n_per_domain * len(domains)), 3)
        table[name] = row
    return table


def print_validity(table):
    domains = [d for d in next(iter(table.values())) if d != "all"]
    print("| scripted agent | knows concerns | asks | words | " + " | ".join(domains) + " | all |")
    print("|---|---|---|---|" + "---|" * (len(domains) + 1))
    for name, row in table.items():
        a = SCRIPTED_AGENTS[name]
        print(f"| {name} | {'yes' if a.knows else 'no'} | {'yes' if a.asks else 'no'} | {a.lines} | "
              + " | ".join(f"{row[d]:.2f}" for d in domains) + f" | **{row['all']:.2f}** |")


# --------------------------------------------------------------------------- the appraisers on labelled lines

def read_labels(path):
    """Labelled lines of a JSONL file; a line that is not UTF-8 JSON stops with FILE:LINE and the reason."""
    try:
        lines = runfiles.jsonl_lines(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the labels ({e.strerror}); pass an existing --labels file.") from None
    for line in lines:
        if line.problem:
            raise ValueError(f"{path}:{line.number}: {line.problem}; fix or remove that line.")
    return [line.record for line in lines]


LABELS = ("probe", "addresses", "false_claim", "open_probe", "push", "off_topic")


def scores(items, predictions):
    """Precision, recall, F1 per label. probe / addresses / false_claim are counted over (utterance, concern)
    pairs, open_probe / push / off_topic over utterances. predictions[i]: an appraisal of items[i]."""
    out = {}
    for label, key in (("probe", "probed"), ("addresses", "addressed"), ("false_claim", "false_claims")):
        gold = {(i, c) for i, it in enumerate(items) for c in it.get(label, [])}
        pred = {(i, c) for i, p in enumerate(predictions) for c in getattr(p, key)}
        out[label] = _prf(len(gold & pred), len(pred), len(gold))
    for label in ("open_probe", "push", "off_topic"):
        tp = sum(it[label] and getattr(p, label) for it, p in zip(items, predictions))
        out[label] = _prf(tp, sum(getattr(p, label) for p in predictions), sum(it[label] for it in items))
    return out


def by_kind(items, predictions):
    """For labelled lines that carry a `kind` (the independent sets): per kind, the share of its false-claim
    pairs caught (recall) and, for soft closes, the share read as a push. {kind: (rate, n)}."""
    out = {}
    for kind in sorted({it["kind"] for it in items if "kind" in it}):
        idx = [i for i, it in enumerate(items) if it.get("kind") == kind]
        gold = [(i, c) for i in idx for c in items[i].get("false_claim", [])]
        if gold:
            out[f"{kind}: false claims caught"] = (sum(c in predictions[i].false_claims for i, c in gold) / len(gold),
                                                   len(gold))
        if kind == "soft_close":
            out[f"{kind}: read as a push"] = (sum(predictions[i].push for i in idx) / len(idx), len(idx))
    return out


DOMAIN_LABELS = ("probe", "addresses", "false_claim")


def by_domain(items, predictions):
    """`scores` of each domain's lines alone: {domain: {label: P / R / F1}} (the issue-30 goals are per domain)."""
    out = {}
    for domain in sorted({it["domain"] for it in items}):
        idx = [i for i, it in enumerate(items) if it["domain"] == domain]
        out[domain] = scores([items[i] for i in idx], [predictions[i] for i in idx])
    return out


def _prf(tp, n_pred, n_gold):
    p = tp / n_pred if n_pred else 1.0
    r = tp / n_gold if n_gold else 1.0
    return {"precision": round(p, 3), "recall": round(r, 3), "f1": round(2 * p * r / (p + r), 3) if p + r else 0.0,
            "n_gold": n_gold}


def appraise_items(kind, items, rules, model=None, tokenizer=None):
    """Every item appraised as if the callee held every concern of its domain and had voiced the item's
    `voiced` concerns (none unless the label says so)."""
    if kind not in ("lexical", "semantic", "llm"):
        raise ValueError(f"appraiser {kind!r} cannot be measured here; use lexical, semantic or llm.")
    appraiser = S.make_appraiser({"appraiser": kind, "rules": rules}, model, tokenizer)
    return appraiser([it["text"] for it in items], [it["domain"] for it in items],
                     [tuple(it.get("voiced", ())) for it in items])


# --------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(description="Is the simulator's reading right? The scripted-agent validity "
                                                 "matrix, or the appraisers' P / R / F1 on labelled lines.")
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("matrix", help="scripted agents vs the simulator's rules")
    m.add_argument("--personas", type=config.positive_int, default=90, help="personas per domain")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--natural-lines", default=None, help="the natural agents' lines (default "
                   "data/natural_agents.yaml, held out; data/natural_agents_dev.yaml is what the rules were tuned on)")
    m.add_argument("--independent-lines", default=None, help="the independent agents' lines (default "
                   "data/natural_agents_independent.yaml, held out; data/natural_agents_independent_dev.yaml: tuning)")
    m.add_argument("--agents", default=None, help="only these agents, comma-separated names")
    a = sub.add_parser("appraisers", help="precision / recall / F1 of the appraisers on labelled lines")
    a.add_argument("--labels", default=LABELS_PATH)
    a.add_argument("--appraisers", default="lexical,semantic,llm")
    a.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    a.add_argument("--by-domain", action="store_true", help="also print probe / addresses / false claim per domain")
    for p in (m, a):
        p.add_argument("overrides", nargs="*", help="config overrides, e.g. simulator.appraiser=lexical")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(None, args.overrides)
    except config.ConfigError as e:
        raise SystemExit(f"config error: {e}")
    if args.what == "matrix":
        print(f"success rate of scripted agents, {args.personas} personas per domain (seed {args.seed}), "
              f"appraiser {cfg['simulator']['appraiser']}, max_turns {cfg['simulator']['max_turns']}")
        try:
            table = validity_matrix(cfg["simulator"], args.personas, args.seed, natural_lines=args.natural_lines,
                                    independent_lines=args.independent_lines,
                                    agents=args.agents.split(",") if args.agents else None)
        except P.DomainError as e:
            raise SystemExit(str(e))
        print_validity(table)
        return
    try:
        items = read_labels(args.labels)
    except ValueError as e:
        raise SystemExit(str(e))
    model = tokenizer = None
    results = {}
    for kind in args.appraisers.split(","):
        if kind == "llm" and model is None:
            tokenizer, model = lm.load_model(cfg["model"])
        t0 = time.perf_counter()
        preds = appraise_items(kind, items, cfg["simulator"]["rules"], model, tokenizer)
        results[kind] = {"ms_per_turn": round(1000 * (time.perf_counter() - t0) / len(items), 1), **scores(items, preds),
                         "by_kind": by_kind(items, preds), "by_domain": by_domain(items, preds)}
    print(f"{len(items)} labelled agent turns ({os.path.relpath(args.labels)}); P / R / F1 per label")
    print("| appraiser | ms/turn | " + " | ".join(LABELS) + " |")
    print("|---|---|" + "---|" * len(LABELS))
    for kind, r in results.items():
        cells = [f"{r[x]['precision']:.2f} / {r[x]['recall']:.2f} / **{r[x]['f1']:.2f}**" for x in LABELS]
        print(f"| {kind} | {r['ms_per_turn']} | " + " | ".join(cells) + " |")
    for kind, r in results.items():
        if r["by_kind"]:
            print(f"{kind}: " + "; ".join(f"{k} {v:.2f} (n {n})" for k, (v, n) in r["by_kind"].items()))
    if args.by_domain:
        print("| appraiser | domain | " + " | ".join(DOMAIN_LABELS) + " |")
        print("|---|---|" + "---|" * len(DOMAIN_LABELS))
        for kind, r in results.items():
            for domain, s in r["by_domain"].items():
                cells = [f"{s[x]['precision']:.2f} / {s[x]['recall']:.2f} / **{s[x]['f1']:.2f}**" for x in DOMAIN_LABELS]
                print(f"| {kind} | {domain} | " + " | ".join(cells) + " |")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
