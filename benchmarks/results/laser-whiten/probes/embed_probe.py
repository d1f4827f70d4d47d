"""Untrained Laser (CPU profile as of 851d84d, item_mean): raw user and item embeddings of 1,000 validation users
(seed 0 draw) and every item, saved for axes_probe.py, plus NDCG@10 with a few centrings.

    PYTHONPATH=. python benchmarks/results/laser-whiten/probes/embed_probe.py amazon-scientific   # -> emb_<dataset>.pt
    python benchmarks/results/laser-whiten/probes/axes_probe.py emb_amazon-scientific.pt
"""
import sys, torch, torch.nn.functional as F, yaml
from recbole.data import create_dataset
from recbole.utils import init_seed
from recbole_llm.core.preparation import data_preparation
from recbole_llm.run.quick_start import build_config, build_model

torch.set_num_threads(1)
dataset_name = sys.argv[1] if len(sys.argv) > 1 else "amazon-scientific"
over = dict(seed=1, show_progress=False, state="ERROR")
for kv in sys.argv[2:]:
    k, v = kv.split("=", 1); over[k] = yaml.safe_load(v)
config = build_config("Laser", dataset_name, config_dict=over, cmd_args=[], profile="cpu")
init_seed(1, True)
ds = create_dataset(config)
train, valid, _ = data_preparation(config, ds)
init_seed(1, True)
model = build_model(config, train._dataset).eval()
rows = [(i[model.ITEM_SEQ], i[model.ITEM_SEQ_LEN], p) for i, _, _, p in valid]
seq, sl, pos = (torch.cat([r[k] for r in rows]) for k in range(3))
keep = torch.randperm(len(pos), generator=torch.Generator().manual_seed(0))[:1000]
seq, sl, pos = seq[keep], sl[keep], pos[keep]
# reference users: 1000 training sequences
tr = train.dataset.inter_feat
ref = torch.randperm(len(tr), generator=torch.Generator().manual_seed(1))[:1000]
rseq, rsl = tr[model.ITEM_SEQ][ref], tr[model.ITEM_SEQ_LEN][ref]
with torch.no_grad():
    items = torch.cat([model.encode_items(torch.arange(s, min(s + 64, model.n_items))) for s in range(1, model.n_items, 64)])
    users = torch.cat([model.forward(seq[s:s+64], sl[s:s+64])[0] for s in range(0, len(pos), 64)])
    refu = torch.cat([model.forward(rseq[s:s+64], rsl[s:s+64])[0] for s in range(0, len(pos), 64)])
torch.save({"items": items, "users": users, "ref": refu, "pos": pos}, f"emb_{dataset_name}.pt")
def ndcg(u, it):
    s = F.normalize(u, dim=-1) @ F.normalize(it, dim=-1).t()
    p = s.gather(1, (pos - 1)[:, None])
    r = (s > p).sum(1) + (s == p).sum(1) - 1
    return float(torch.where(r < 10, 1 / torch.log2(r.float() + 2), torch.zeros(1)).mean()), float(torch.exp(torch.log(r.float() + 1).mean()))
mi, mu = items.mean(0), refu.mean(0)
print("raw", ndcg(users, items))
print("item mean both (current)", ndcg(users - mi, items - mi))
print("user mean / item mean", ndcg(users - mu, items - mi))
# whitening-lite: remove top-k principal directions of items from both
for k in (1, 3, 10):
    U, S, V = torch.pca_lowrank(items - mi, q=k, center=False)
    P = torch.eye(items.size(1)) - V @ V.t()
    print(f"user mean / item mean, top {k} item PCs removed", ndcg((users - mu) @ P, (items - mi) @ P))
