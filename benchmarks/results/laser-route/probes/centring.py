# Untrained Laser (CPU profile, seed 1): rank the first validation users against all items with different centrings
# of the raw user/item embeddings; "hub share" = the share of all top-10 slots taken by the 10 most-recommended items.
# "users by user mean" here subtracts the mean of these validation users themselves (the model's user_mean uses a
# fixed sample of training sequences). NDCG without a history mask, as RecBole's sequential full ranking.
# Run from the repository root: python benchmarks/results/laser-route/probes/centring.py amazon-scientific 512
# (the frozen BERT4Rec is read from the quality benchmark's cache, ~/.cache/recbole_llm/benchmarks/cpu/saved).
import sys, os, time
import torch
torch.set_num_threads(1)
import torch.nn.functional as F
from recbole_llm.run.quick_start import build_config, read_dataset, build_model
from recbole.data import data_preparation
from recbole.utils import init_seed
ds = sys.argv[1]; n_users = int(sys.argv[2]) if len(sys.argv) > 2 else 512
cfg = build_config('Laser', ds, profile='cpu', config_dict={'epochs': 0, 'seed': 1,
      'checkpoint_dir': os.path.expanduser('~/.cache/recbole_llm/benchmarks/cpu/saved'), 'show_progress': False})
init_seed(1, True)
dataset = read_dataset(cfg)
train, valid, test = data_preparation(cfg, dataset)
model = build_model(cfg, train._dataset).eval()
t = time.time()
model.score_centering = 'none'
with torch.no_grad():
    # raw item rows (unnormalised): recompute
    items = torch.arange(1, model.n_items)
    raw_items = torch.cat([model.encode_items(items[i:i+256]) for i in range(0, len(items), 256)])
    print('items encoded', time.time() - t, flush=True)
    users, targets, hist = [], [], []
    for batch in valid:
        inter, hidx, pu, pi = batch
        seq, ln = inter[model.ITEM_SEQ], inter[model.ITEM_SEQ_LEN]
        for s in range(0, len(seq), 64):
            users.append(model.forward(seq[s:s+64], ln[s:s+64])[0])
        tg = torch.full((len(seq),), -1, dtype=torch.long); tg[pu] = pi; targets.append(tg)
        if hidx is not None: hist.append((hidx[0] + sum(len(t) for t in targets[:-1]), hidx[1]))
        if sum(len(t) for t in targets) >= n_users: break
    U = torch.cat(users)[:n_users]; T = torch.cat(targets)[:n_users]
    print('users encoded', time.time() - t, flush=True)
histmask = torch.zeros(len(U), model.n_items, dtype=torch.bool)
for r, c in hist:
    keep = r < n_users; histmask[r[keep], c[keep]] = True
# train-set popularity
pop = torch.zeros(model.n_items)
for batch in train:
    pop += torch.bincount(batch[model.POS_ITEM_ID], minlength=model.n_items).float()
def ndcg(scores):
    s = scores.clone(); s[:, 0] = -1e9; s[histmask] = -1e9
    tgt = s.gather(1, T[:, None])
    rank = (s > tgt).sum(1) + 0  # ties for
    rank_against = (s >= tgt).sum(1) - 1
    f = lambda r: torch.where(r < 10, 1 / torch.log2(r.float() + 2), torch.zeros(())).mean().item()
    top = s.topk(10, dim=1).indices
    counts = torch.bincount(top.flatten(), minlength=model.n_items).float()
    hub = counts.topk(10).values.sum().item() / top.numel()
    return f(rank), f(rank_against), hub
def whiten(X, eps=0.01):
    _, S, V = torch.linalg.svd(X, full_matrices=False)
    return V.t() @ torch.diag(1 / (S / S.max() + eps)) @ V
I = raw_items; mu_i = I.mean(0); mu_u = U.mean(0)
W_i = whiten(I - mu_i)
rows = {
 'plain cosine': (U, I),
 'item_mean (both by item mean)': (U - mu_i, I - mu_i),
 'whiten (both by item mean + item whitening) [CPU profile]': ((U - mu_i) @ W_i, (I - mu_i) @ W_i),
 'separate: users by user mean, items by item mean': (U - mu_u, I - mu_i),
 'separate + item whitening': ((U - mu_u) @ W_i, (I - mu_i) @ W_i),
}
print(f'{ds}: {len(U)} validation users, {len(I)} items; cos(mu_u, mu_i)={F.cosine_similarity(mu_u, mu_i, dim=0):.3f}, |mu_u-mu_i|/|U-mu_u| rms {((mu_u-mu_i).norm() / (U-mu_u).norm(dim=1).mean()):.2f}')
print('pop', ndcg(pop.expand(len(U), -1)))
for name, (u, i) in rows.items():
    s = F.normalize(u, dim=-1) @ F.normalize(i, dim=-1).t()
    full = torch.zeros(len(U), model.n_items); full[:, 1:] = s
    print(f'{name:60s} ndcg ties-for/against {ndcg(full)[0]:.4f}/{ndcg(full)[1]:.4f}  top10 share of 10 hub items {ndcg(full)[2]:.3f}')
