"""Issue 30 experiment (not used by the simulator): does contrastive fine-tuning of the appraiser's
MiniLM on the banks' own lines -- SetFit's body step -- read which concern a question asks about
better than the base encoder?

Measured as the semantic reader decides it (`appraisal.SemanticAppraiser._bank`: a question goes to the
concern whose topic centroid it is closest to): top-1 concern of every single-concern question of the
*development* lines (data/appraisal_independent_dev.jsonl; the held-out independent lines are never
used here), base encoder against fine-tuned ones. Training pairs come from each bank's concerns
(probe exemplars, cue phrases, the callee's statement and resolution; `+answers` adds the answer
exemplars): SetFit's CosineSimilarityLoss (same concern 1, another concern of the bank 0) or in-batch
negatives (MultipleNegativesRankingLoss, scale 20). Seeded; 2 CPU threads; prints a table and a JSON
last line. Result and command: docs/simulator.md, "the readers tried for issue 30".

    python scripts/topic_finetune.py
"""
import copy
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import appraisal as A          # noqa: E402
import personas as P           # noqa: E402

DOMAINS = ("broadband_switch", "courier_recruitment", "merchant_recruitment")
DEV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "appraisal_independent_dev.jsonl")


def concern_lines(bank, answers):
    return {c["id"]: (c.get("probe_examples") or []) + ((c.get("answer_examples") or []) if answers else [])
            + c["probe_cues"] + [c["statement"], c["resolution"]] for c in bank["concerns"]}


def encode(tok, model, texts):
    batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@torch.no_grad()
def top1(tok, model, banks, items):
    """{domain: (right, n)}: the concern whose centroid (as shipped: with the answers) is closest."""
    out = {}
    for d, bank in banks.items():
        lines = concern_lines(bank, answers=True)
        ids = list(lines)
        centroids = torch.nn.functional.normalize(torch.stack([encode(tok, model, lines[c]).mean(0) for c in ids]), dim=-1)
        mine = [it for it in items if it["domain"] == d]
        pred = (encode(tok, model, [it["text"] for it in mine]) @ centroids.T).argmax(1)
        out[d] = (sum(ids[int(p)] == it["probe"][0] for p, it in zip(pred, mine)), len(mine))
    return out


def finetune(tok, model, banks, answers, loss, epochs, lr, seed=0):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    pairs = []
    for bank in banks.values():
        lines = concern_lines(bank, answers)
        for c, texts in lines.items():
            others = [k for k in lines if k != c]
            for t in texts:
                for _ in range(2):
                    pairs.append((t, rng.choice([x for x in texts if x != t]), 1.0))
                    if loss == "cosine":
                        pairs.append((t, rng.choice(lines[rng.choice(others)]), 0.0))
    for _ in range(epochs):
        rng.shuffle(pairs)
        for i in range(0, len(pairs), 16):
            batch = pairs[i:i + 16]
            u, v = encode(tok, model, [p[0] for p in batch]), encode(tok, model, [p[1] for p in batch])
            if loss == "cosine":
                value = ((u * v).sum(-1) - torch.tensor([p[2] for p in batch])).pow(2).mean()
            else:    # in-batch negatives (a pair of one concern may meet another pair of the same: rare, kept)
                value = torch.nn.functional.cross_entropy(20 * u @ v.T, torch.arange(len(batch)))
            opt.zero_grad()
            value.backward()
            opt.step()
    return model.eval(), len(pairs)


def main():
    torch.set_num_threads(2)
    embedder = A.Embedder.shared()
    banks = {d: P.load_bank(d) for d in DOMAINS}
    items = [it for it in map(json.loads, open(DEV)) if len(it["probe"]) == 1 and not it["push"]]
    rows = {"base": (top1(embedder.tokenizer, embedder.model, banks, items), 0, 0.0)}
    for name, answers, loss, epochs in (("cosine, probes", False, "cosine", 1), ("cosine, +answers", True, "cosine", 1),
                                        ("cosine, probes, 3 epochs", False, "cosine", 3),
                                        ("in-batch negatives, probes", False, "mnrl", 1)):
        t0 = time.perf_counter()
        model, n = finetune(embedder.tokenizer, embedder.model, banks, answers, loss, epochs, 2e-5)
        rows[name] = (top1(embedder.tokenizer, model, banks, items), n, time.perf_counter() - t0)
    print(f"top-1 concern of {len(items)} single-concern development questions (right / n)")
    print(f"{'encoder':28s}" + "".join(f"{d[:10]:>14s}" for d in DOMAINS) + f"{'all':>8s}{'pairs':>7s}{'train s':>9s}")
    result = {}
    for name, (r, n, s) in rows.items():
        right, total = sum(a for a, _ in r.values()), sum(b for _, b in r.values())
        print(f"{name:28s}" + "".join(f"{f'{a}/{b} {a / b:.2f}':>14s}" for a, b in r.values()) + f"{right / total:8.3f}{n:7d}{s:9.0f}")
        result[name] = {"all": round(right / total, 3), **{d: round(a / b, 3) for d, (a, b) in r.items()}, "train_s": round(s)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
