"""Cache the untrained Laser's vectors (CPU profile, whiten, seed 1, amazon-scientific): every item, 1,000 fixed validation
users (drawn as laser_steps.py draws them) and the first N training sequences, centred and whitened, not normalised.
    python cache_vectors.py 4096 /tmp/cache_4096.pt"""
import sys, time, torch
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..', '..', '..', '..'))
from recbole.data import create_dataset
from recbole.utils import init_seed
from recbole_llm.core.preparation import data_preparation
from recbole_llm.run.quick_start import build_config, build_model
torch.set_num_threads(1)
ntrain, out_path = int(sys.argv[1]), sys.argv[2]
# suffix_init random: the CPU profile's value when these numbers were taken (fbc9d71)
overrides = dict(seed=1, show_progress=False, state='ERROR', score_centering='whiten', suffix_init='random')
config = build_config('Laser', 'amazon-scientific', config_dict=overrides, cmd_args=[], profile='cpu')
init_seed(1, True)
dataset = create_dataset(config)
train, valid, _ = data_preparation(config, dataset)
init_seed(1, True)
model = build_model(config, train._dataset).eval()
t = time.time()
with torch.no_grad():
    model.refresh_item_matrix(force=True, show_progress=False)
    raw = lambda seq, ln: torch.cat([(model.forward(seq[s:s+64], ln[s:s+64])[0] - model.item_center) @ model.item_whitening for s in range(0, len(seq), 64)])
    # items, unnormalised whitened
    items = torch.cat([(model.encode_items(torch.arange(s, min(s+64, model.n_items))) - model.item_center) @ model.item_whitening for s in range(1, model.n_items, 64)])
    items = torch.cat([torch.zeros(1, items.size(1)), items])
    rows = [(i[model.ITEM_SEQ], i[model.ITEM_SEQ_LEN], p) for i, _, _, p in valid]
    vs, vl, vp = (torch.cat([r[k] for r in rows]) for k in range(3))
    keep = torch.randperm(len(vp), generator=torch.Generator().manual_seed(0))[:1000]
    vs, vl, vp = vs[keep], vl[keep], vp[keep]
    vu = raw(vs, vl)
    tr = []
    for inter in train:
        tr.append((inter[model.ITEM_SEQ], inter[model.ITEM_SEQ_LEN], inter[model.POS_ITEM_ID]))
        if sum(len(x[2]) for x in tr) >= ntrain: break
    ts, tl, tp = (torch.cat([r[k] for r in tr]) for k in range(3))
    tu = raw(ts, tl)
print(f'cached {len(tp)} train, {len(vp)} valid users, {model.n_items} items in {time.time()-t:.0f}s', flush=True)
torch.save(dict(items=items, vu=vu, vp=vp, tu=tu, tp=tp, ts=ts, vs=vs), out_path)
