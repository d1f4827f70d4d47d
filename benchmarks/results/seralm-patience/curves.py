"""Per-epoch training loss and validation NDCG@10 of each run in a quality JSONL, read from the runs' RecBole logs,
and each pair's mean over the epochs both ran (epoch 1 on: epoch 0 is mostly the start).
    python curves.py quality-cpu.jsonl [more.jsonl ...]"""
import json
import os
import re
import sys
from collections import defaultdict

EPOCH = re.compile(r"epoch (\d+) training \[time: [0-9.]+s, train loss: ([0-9.]+)")
NDCG = re.compile(r"ndcg@10 : ([0-9.]+)")

curves = defaultdict(dict)
for path in sys.argv[1:]:
    for line in open(path):
        record = json.loads(line)
        if record.get("status") != "ok":
            continue
        losses, valid = [], []
        if not os.path.exists(record["log"]):
            print(f"(no log for {record['run_id']}: {record['log']})")
            continue
        with open(record["log"]) as log:
            for text in log:
                if m := EPOCH.search(text):
                    losses.append(float(m.group(2)))
                elif len(valid) < len(losses) and (m := NDCG.search(text)):  # the epoch's validation metrics
                    valid.append(float(m.group(1)))
        curves[(record["dataset"], record["seed"])][record["variant"]] = (losses, valid, record)

for (dataset, seed), runs in sorted(curves.items()):
    print(f"== {dataset} seed {seed}")
    common = min(len(v[1]) for v in runs.values())
    for variant, (losses, valid, record) in sorted(runs.items()):
        window = valid[1:common]
        print(f"  {variant:24s} best epoch {record['best_epoch']:>2} of {len(valid)}, test {record['test']['ndcg@10']}, "
              f"valid best {record['valid']['ndcg@10']}; epochs 1-{common - 1}: mean valid "
              f"{sum(window) / max(len(window), 1):.4f}, last train loss {losses[common - 1]:.2f}")
        print("     valid by epoch", " ".join(f"{v:.4f}" for v in valid))
