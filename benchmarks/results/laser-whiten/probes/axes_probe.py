"""NDCG@10 of the saved untrained embeddings (embed_probe.py) when the top-k principal axes of the centred item
matrix are removed, or the axes are soft-whitened (scale 1 / (s_k / s_max + eps), or on the variance scale)."""
import sys, torch, torch.nn.functional as F
d = torch.load(sys.argv[1]); items, users, ref, pos = d["items"], d["users"], d["ref"], d["pos"]
def ndcg(u, it):
    s = F.normalize(u, dim=-1) @ F.normalize(it, dim=-1).t()
    p = s.gather(1, (pos - 1)[:, None]); r = (s > p).sum(1) + (s == p).sum(1) - 1
    return round(float(torch.where(r < 10, 1 / torch.log2(r.float() + 2), torch.zeros(1)).mean()), 4), round(float(torch.exp(torch.log(r.float() + 1).mean())))
mi = items.mean(0)
print("raw", ndcg(users, items))
c = items - mi
U, S, V = torch.linalg.svd(c, full_matrices=False)
print("item var share top 10 PCs", [round(float(x), 3) for x in (S[:10] ** 2 / (S ** 2).sum())])
for k in (0, 1, 2, 3, 4, 5, 6, 8, 10, 20, 50):
    Vk = V[:k].t()
    P = torch.eye(items.size(1)) - Vk @ Vk.t()
    print(k, ndcg((users - mi) @ P, c @ P))
# whitening
for eps in (1e-3, 1e-2):
    W = V.t() @ torch.diag(1 / (S / S.max() + eps)) @ V
    print("whiten", eps, ndcg((users - mi) @ W, c @ W))
# user projection: how much of user-vs-item-mean difference lies in top PCs
du = users - mi
print("user offset norm share in top3", float(((du @ V[:3].t()) ** 2).sum() / (du ** 2).sum()))
print("---- eps grid (s relative to smax)")
for eps in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0):
    W = V.t() @ torch.diag(1 / (S / S.max() + eps)) @ V
    print("whiten", eps, ndcg((users - mi) @ W, c @ W))
print("---- on variance scale: 1/sqrt(lambda/lmax + eps)")
lam = S ** 2 / (S ** 2).max()
for eps in (1e-4, 1e-3, 1e-2, 1e-1):
    W = V.t() @ torch.diag(1 / torch.sqrt(lam + eps)) @ V
    print("whiten-var", eps, ndcg((users - mi) @ W, c @ W))
