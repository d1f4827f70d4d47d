"""On cached untrained vectors (cache_vectors.py): can anything trained by IIC on top of them beat them?

    python offline_metric.py /tmp/cache_4096.pt

NDCG@10 on the 1,000 validation users with their history items masked, as RecBole's full-ranking evaluator does.
1. the untrained ranking on validation users and on the training sequences (train CE with and without the
   sequence's own items in the softmax);
2. the untrained cosine plus beta * log(1 + popularity) (popularity counted over the cached training positives);
3. a metric trained by IIC (Adam, batch 16, tau 0.05) on the cached training vectors, nothing else trained:
   diagonal scaling exp(w) (w = 0 at start) or a full d x d matrix (identity at start), with the sequence's own
   items in or out of the training softmax.
"""
import sys

import torch
import torch.nn.functional as F

from cached_vectors import CachedVectors

cache = CachedVectors(sys.argv[1])
items, vu, tu, tp, ts = cache.items, cache.vu, cache.tu, cache.tp, cache.ts
n_items, dim = items.shape
own_items, ndcg = cache.own_items, cache.ndcg

unit_items = F.normalize(items, dim=-1)
base = F.normalize(vu, dim=-1) @ unit_items.t()
train_scores = F.normalize(tu, dim=-1) @ unit_items.t()
padding = (torch.arange(n_items) == 0).expand(len(tp), -1)
print(f"1. untrained: valid NDCG@10 {ndcg(base)}; training sequences NDCG@10 (own items masked) "
      f"{ndcg(train_scores, tp, own_items(ts, tp))}, CE at tau 0.05 with own items in the softmax "
      f"{float(F.cross_entropy((train_scores / 0.05).masked_fill(padding, -1e9), tp)):.3f}, without "
      f"{float(F.cross_entropy((train_scores / 0.05).masked_fill(own_items(ts, tp), -1e9), tp)):.3f}")
popularity = torch.log1p(torch.bincount(tp, minlength=n_items).float())
print("2. + beta * log(1 + popularity):", {beta: ndcg(base + beta * popularity) for beta in (0.0, 0.02, 0.05, 0.1)})
for kind, lr in (("diag", 1e-3), ("full", 1e-4)):
    for mask_own in (False, True):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.zeros(dim) if kind == "diag" else torch.eye(dim))
        apply = (lambda x: x * weight.exp()) if kind == "diag" else (lambda x: x @ weight)
        optimizer = torch.optim.Adam([weight], lr=lr)
        by_epoch = []
        for epoch in range(4):
            if epoch:
                order = torch.randperm(len(tp))
                for start in range(0, len(tp), 16):
                    idx = order[start:start + 16]
                    logits = F.normalize(apply(tu[idx]), dim=-1) @ F.normalize(apply(items), dim=-1).t() / 0.05
                    logits = logits.masked_fill(own_items(ts[idx], tp[idx]) if mask_own else padding[:len(idx)], -1e9)
                    optimizer.zero_grad()
                    F.cross_entropy(logits, tp[idx]).backward()
                    optimizer.step()
            with torch.no_grad():
                by_epoch.append(ndcg(F.normalize(apply(vu), dim=-1) @ F.normalize(apply(items), dim=-1).t()))
        print(f"3. {kind} metric, lr {lr}, own items {'masked' if mask_own else 'in'} the softmax: valid NDCG@10 by "
              f"epoch {by_epoch}", flush=True)
