# Logit spread of a trained Laser checkpoint on its first test batch: is the IIC softmax near uniform at tau, and
# would a sharper temperature rank better? Run from the directory holding saved/Laser-*.pth (the README command's).
import glob
import math

import torch

torch.set_num_threads(1)
from recbole_llm.run.quick_start import load_data_and_model
path = sorted(glob.glob('saved/Laser-*.pth'))[-1]
config, model, dataset, train_data, valid_data, test_data = load_data_and_model(path)
model.eval()
batch = next(iter(test_data))
interaction = batch[0]
with torch.no_grad():
    # RecBole's full-sort batch: (interaction, history index, positive_u, positive_i)
    pos_u, pos_i = batch[2], batch[3]
    matrix = model._require_item_matrix()
    user = model._user_embeddings_chunked(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])
    cos = user @ matrix.t()
    cos[:, 0] = -1e9
    b = model.item_bias if model.item_bias is not None else torch.zeros(cos.shape[1])
    tau = model.temperature
    print(f"checkpoint {path}; {cos.shape[0]} test users, tau {tau}")
    c = cos[:, 1:]
    print(f"cosine per user: std {c.std(1).mean():.4f}, max-min {(c.max(1).values - c.min(1).values).mean():.4f}, mean {c.mean():.4f}")
    print(f"bias: std {b[1:].std():.4f}, range [{b[1:].min():.3f}, {b[1:].max():.3f}]")
    tgt = torch.full((cos.shape[0],), -1, dtype=torch.long); tgt[pos_u] = pos_i
    def report(name, logits):
        logits = logits.clone(); logits[:, 0] = -1e9
        ce = torch.nn.functional.cross_entropy(logits, tgt)
        rank = (logits > logits.gather(1, tgt[:, None])).sum(1)
        ndcg = torch.where(rank < 10, 1 / torch.log2(rank.float() + 2), torch.zeros(())).mean()
        print(f"  {name:32s} CE {ce:.3f} (ln N {math.log(cos.shape[1]-1):.3f}), NDCG@10 {ndcg:.4f} (no history mask)")
    report("cos/tau + b (the model)", cos / tau + b)
    report("cos/tau", cos / tau)
    report("b alone", b.expand_as(cos).clone())
    for t in (0.02, 0.01, 0.005):
        report(f"cos/{t} + b", cos / t + b)
