"""A learned per-item bias b_i on the cached untrained vectors (../../laser-training-controls/probes/cache_vectors.py:
CPU profile, whiten, seed 1, the random suffix of that time): logits = cos / tau + b_i, b = 0 at the start, trained by
IIC with nothing else trained, on the first 1,536 (the CPU profile's 3 epochs of 512) or 4,096 cached training sequences.
NDCG@10 on the 1,000 cached validation users, own history masked as RecBole does.
    python bias_offline.py /tmp/cache_4096.pt"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "laser-training-controls", "probes"))
from cached_vectors import CachedVectors  # noqa: E402

torch.set_num_threads(1)
cache = CachedVectors(sys.argv[1])
items, vu, tu, tp, ts = cache.items, cache.vu, cache.tu, cache.tp, cache.ts
n_items = cache.n_items
own_items, ndcg = cache.own_items, cache.ndcg
U = F.normalize(items, dim=-1); base = F.normalize(vu, dim=-1) @ U.t(); tr = F.normalize(tu, dim=-1) @ U.t()
tau = 0.05
print("untrained", ndcg(base))
padding = (torch.arange(n_items) == 0)
for budget in (1536, 4096):
  for opt in ("adam", "sgd"):
    for lr in ((1e-3, 1e-2, 3e-2, 1e-1) if opt == "adam" else (1.0, 10.0, 30.0)):
      for mask_own in (False, True):
        torch.manual_seed(0)
        b = torch.nn.Parameter(torch.zeros(n_items))
        o = torch.optim.Adam([b], lr=lr) if opt == "adam" else torch.optim.SGD([b], lr=lr)
        order = torch.randperm(len(tp))[:budget]
        for s in range(0, budget, 16):
            idx = order[s:s+16]
            logits = tr[idx] / tau + b
            logits = logits.masked_fill(own_items(ts[idx], tp[idx]) if mask_own else padding.expand(len(idx), -1), -1e9)
            o.zero_grad(); F.cross_entropy(logits, tp[idx]).backward(); o.step()
        with torch.no_grad():
            print(f"budget {budget} {opt} lr {lr} own {'masked' if mask_own else 'in'}: {ndcg(base / tau + b)}  |b| max {float(b.abs().max()):.2f}", flush=True)
