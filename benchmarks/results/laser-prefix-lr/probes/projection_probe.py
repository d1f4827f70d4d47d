"""Probe (not package code): a shared learned projection P (identity at the start) applied to the centred user and
item LLM outputs before the cosine; P gets gradient from both towers (items from the cached raw matrix). Patches
Laser in this process only, then runs benchmarks/laser_steps.py with the same arguments:

    PLR=1e-4 python benchmarks/results/laser-prefix-lr/probes/projection_probe.py --dataset ml-100k --users 943 \
        --steps 300 --eval_every 100 --tag ml_proj4 prefix_learning_rate=1e-4
"""
import sys, os, types
import torch, torch.nn as nn, torch.nn.functional as F
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[".."] * 4))
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import laser_steps
from recbole_llm.model.sequential_recommender import laser as L

PLR = float(os.environ.get("PLR", "1e-3"))
DIM = int(os.environ.get("PDIM", "0"))
orig_init = L.Laser.__init__
def init(self, config, dataset):
    orig_init(self, config, dataset)
    d = self.llm_size
    out = DIM or d
    self.proj = nn.Linear(d, out, bias=False)
    with torch.no_grad():
        if out == d:
            self.proj.weight.copy_(torch.eye(d))
        else:
            nn.init.orthogonal_(self.proj.weight)
    self.raw_matrix = None
L.Laser.__init__ = init

orig_groups = L.Laser.parameter_groups
def groups(self, lr):
    g = orig_groups(self, lr)
    ids = {id(p) for p in self.proj.parameters()}
    for grp in g:
        grp["params"] = [p for p in grp["params"] if id(p) not in ids]
    return g + [{"params": list(self.proj.parameters()), "lr": PLR}]
L.Laser.parameter_groups = groups

orig_refresh = L.Laser.refresh_item_matrix
def refresh(self, force=False, show_progress=True):
    # raw centred matrix: recompute by undoing normalisation is impossible, so encode again via original
    # with centring none, then centre ourselves
    sc = self.score_centering
    self.score_centering = "none"
    ok = orig_refresh(self, force=force, show_progress=show_progress)
    self.score_centering = sc
    return ok
L.Laser.refresh_item_matrix = refresh

# the matrix stored by refresh is normalised h (no centring); we need raw -> patch F.normalize inside refresh is hard;
# instead capture raw rows in encode_items during refresh
orig_encode_items = L.Laser.encode_items
def encode_items(self, items):
    h = orig_encode_items(self, items)
    if not torch.is_grad_enabled():
        if self.raw_matrix is None or self.raw_matrix.size(0) != self.n_items:
            self.raw_matrix = torch.zeros(self.n_items, h.size(-1))
        self.raw_matrix[items] = h.detach()
    return h
L.Laser.encode_items = encode_items

def proj_items(self):
    raw = self.raw_matrix[1:]
    c = raw.mean(0)
    m = F.normalize(self.proj(raw - c), dim=-1)
    return torch.cat([m.new_zeros(1, m.size(1)), m]), c

def calculate_loss(self, interaction):
    items, c = proj_items(self)
    user, lb = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
    user = F.normalize(self.proj(user - c), dim=-1)
    logits = user @ items.t() / self.temperature
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, interaction[self.POS_ITEM_ID]), self.lb_weight * lb
L.Laser.calculate_loss = calculate_loss

def full_sort_predict(self, interaction):
    with torch.no_grad():
        items, c = proj_items(self)
        user = torch.cat([self.forward(s, l)[0] for s, l in [(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])]])
        user = F.normalize(self.proj(user - c), dim=-1)
        return user @ items.t()
L.Laser.full_sort_predict = full_sort_predict

def chunked(self, seq, seq_len):
    with torch.no_grad():
        items, c = proj_items(self)
        return F.normalize(self.proj(self.forward(seq, seq_len)[0] - c), dim=-1)
L.Laser._user_embeddings_chunked = chunked

laser_steps.main()
