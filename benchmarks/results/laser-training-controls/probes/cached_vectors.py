"""The vectors cache_vectors.py writes, and the NDCG@10 the offline probes (offline_metric.py,
../../laser-item-bias/probes/bias_offline.py) score them with: every item, 1,000 validation users (vu: vectors, vp:
targets, vs: histories) and N training sequences (tu, tp, ts), each sequence's own history items masked as RecBole's
full-ranking evaluator does."""
import torch


class CachedVectors:
    def __init__(self, path):
        cache = torch.load(path)
        self.items, self.vu, self.vp, self.vs, self.tu, self.tp, self.ts = (
            cache[k] for k in ("items", "vu", "vp", "vs", "tu", "tp", "ts"))
        self.n_items = self.items.size(0)
        self.valid_mask = self.own_items(self.vs)

    def own_items(self, seq, pos=None):
        """[B, n_items] True at the padding item and each row's history items."""
        mask = torch.zeros(len(seq), self.n_items, dtype=torch.bool)
        mask.scatter_(1, seq, True)
        mask[:, 0] = True
        if pos is not None:
            mask[torch.arange(len(pos)), pos] = False  # a repeat of the target stays the target
        return mask

    def ndcg(self, scores, pos=None, mask=None):
        """NDCG@10 of the targets ``pos`` (the validation users' by default) under ``scores``, ties counted against."""
        pos = self.vp if pos is None else pos
        scores = scores.masked_fill(self.valid_mask if mask is None else mask, -1e9)
        target = scores.gather(1, pos[:, None])
        rank = (scores > target).sum(1) + (scores == target).sum(1) - 1
        return round(float(torch.where(rank < 10, 1 / torch.log2(rank.float() + 2), torch.zeros(())).mean()), 4)
