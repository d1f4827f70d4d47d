"""M-Former: the MoE-based querying transformer of Laser (paper 3.2, Eq. 5-7 and 9-11).

K query experts of L learned tokens each; a router picks one expert per user from the frozen SR's
per-position states C_u; the chosen expert's tokens pass Z transformer blocks (self-attention, then
cross-attention to C_u in alternate blocks, then a feed-forward layer) and a linear map to the LLM width,
giving the prefix P (L tokens).

Choices where the paper is silent (documented here and in Laser.yaml):
- Cross-attention sits in blocks 0, 2, 4, ... (BLIP-2's Q-Former places it every other block, from the first).
- Blocks are pre-LayerNorm with a final LayerNorm (stable from random init; the paper initialises randomly).
- The router's argmax has no gradient. With ``router_gradient: gate`` the chosen expert's tokens are multiplied
  by r_j / stopgrad(r_j): the value is exactly 1 (forward unchanged) while d/dr_j = 1 / r_j gives the router
  a Switch-Transformer-style gradient from the recommendation loss. ``lb_only``: the router learns from L_LB only.
- L_LB (Eq. 9-11) is computed per user over that user's N real items and averaged over the batch.
- The router is ``Linear(d_i, K)`` without a bias, as Eq. 5 (m(u) = C_u W_r^T). ``router_bias: True`` adds a
  per-expert bias: what earlier versions of the plugin had, so their checkpoints load with it.
- Size: at the paper's settings (K=8, L=32, d_m=768, 12 blocks, FFN 3072, d_llm=4096) this M-Former has 96.1M
  parameters; the paper reports 183.3M trainable in all. The gap is about the size of a BLIP-2 Q-Former's extra
  parts (separate query FFNs, BERT-base embeddings), which the paper may have started from; it does not say.
"""

import torch
from torch import nn

ROUTER_GRADIENTS = ("gate", "lb_only")


def masked_router_probs(logits, mask):
    """Per-item expert probabilities p_{i,j} (Eq. 6) and their mean over real items r_j (Eq. 7).

    Args:
        logits: [B, N, K] router scores m(u).
        mask: [B, N] bool, True at real (unpadded) items.

    Returns:
        probs [B, N, K] (zero at padded items), scores [B, K].
    """
    probs = torch.softmax(logits.float(), dim=-1) * mask.unsqueeze(-1)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1)
    return probs, probs.sum(dim=1) / count


def load_balance_loss(probs, mask):
    """Eq. 9-11: K * sum_j f_j * P_j per user (f_j: share of the user's real items whose argmax is j,
    P_j: mean router probability of j over those items), averaged over the batch."""
    n_experts = probs.size(-1)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1)
    top = nn.functional.one_hot(probs.argmax(dim=-1), n_experts) * mask.unsqueeze(-1)
    fraction = top.sum(dim=1) / count  # f_j, no gradient (argmax)
    prob_share = probs.sum(dim=1) / count  # P_j
    return (n_experts * (fraction * prob_share).sum(dim=-1)).mean()


class MFormerBlock(nn.Module):
    """Self-attention over the query tokens, optional cross-attention to C_u, feed-forward (pre-LN)."""

    def __init__(self, hidden_size, n_heads, inner_size, collab_size, dropout, cross_attention):
        super().__init__()
        self.self_norm = nn.LayerNorm(hidden_size)
        self.self_attn = nn.MultiheadAttention(hidden_size, n_heads, dropout=dropout, batch_first=True)
        self.cross_attention = cross_attention
        if cross_attention:
            self.cross_norm = nn.LayerNorm(hidden_size)
            self.cross_attn = nn.MultiheadAttention(hidden_size, n_heads, dropout=dropout, batch_first=True,
                                                    kdim=collab_size, vdim=collab_size)
        self.ffn_norm = nn.LayerNorm(hidden_size)
        self.ffn = nn.Sequential(nn.Linear(hidden_size, inner_size), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(inner_size, hidden_size))
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, collab, collab_mask):
        x = self.self_norm(queries)
        queries = queries + self.dropout(self.self_attn(x, x, x, need_weights=False)[0])
        if self.cross_attention:
            x = self.cross_norm(queries)
            # key_padding_mask: True = ignore, so padded SR positions are never attended.
            attended = self.cross_attn(x, collab, collab, key_padding_mask=~collab_mask, need_weights=False)[0]
            queries = queries + self.dropout(attended)
        return queries + self.dropout(self.ffn(self.ffn_norm(queries)))


class MFormer(nn.Module):
    """MoE querying transformer: C_u [B, N, d_i] + mask [B, N] -> prefix [B, L, d_llm] and L_LB."""

    def __init__(self, collab_size, llm_size, n_experts=8, n_query_tokens=32, hidden_size=768, n_layers=12,
                 n_heads=12, inner_size=3072, dropout=0.1, router_gradient="gate", router_bias=False):
        super().__init__()
        if router_gradient not in ROUTER_GRADIENTS:
            raise ValueError(f"router_gradient must be one of {ROUTER_GRADIENTS}, got {router_gradient!r}")
        if hidden_size % n_heads:
            raise ValueError(f"mformer_hidden_size ({hidden_size}) must be divisible by mformer_n_heads ({n_heads})")
        self.n_experts = n_experts
        self.router_gradient = router_gradient
        self.experts = nn.Parameter(torch.randn(n_experts, n_query_tokens, hidden_size) * 0.02)
        self.router = nn.Linear(collab_size, n_experts, bias=router_bias)
        self.blocks = nn.ModuleList(
            MFormerBlock(hidden_size, n_heads, inner_size, collab_size, dropout, cross_attention=(z % 2 == 0))
            for z in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(hidden_size)
        self.projection = nn.Linear(hidden_size, llm_size)

    def init_projection(self, how, token_std):
        """default: PyTorch's Linear init; token_scale: prefix entries start with the std of the LLM's token
        embeddings; zero: prefix starts at zero."""
        if how == "default":
            return
        nn.init.zeros_(self.projection.bias)
        if how == "zero":
            nn.init.zeros_(self.projection.weight)
        else:  # the final LayerNorm gives unit-variance inputs: std(out) = sqrt(d_m) * std(w)
            nn.init.normal_(self.projection.weight, std=token_std / self.projection.in_features ** 0.5)

    def route(self, collab, collab_mask):
        """Chosen expert per user [B], its score r_j [B] and L_LB (scalar)."""
        probs, scores = masked_router_probs(self.router(collab), collab_mask)
        chosen = scores.argmax(dim=-1)
        chosen_score = scores.gather(1, chosen.unsqueeze(1)).squeeze(1)
        if self.n_experts == 1:  # nothing to balance
            return chosen, chosen_score, scores.new_zeros(())
        return chosen, chosen_score, load_balance_loss(probs, collab_mask)

    def forward(self, collab, collab_mask):
        """Returns (prefix [B, L, d_llm], load-balance loss, chosen expert ids [B])."""
        collab_mask = collab_mask.bool()
        chosen, chosen_score, lb_loss = self.route(collab, collab_mask)
        queries = self.experts[chosen]  # [B, L, d_m]
        if self.router_gradient == "gate" and self.n_experts > 1:
            gate = chosen_score / chosen_score.detach()
            queries = queries * gate.to(queries.dtype)[:, None, None]
        collab = collab.to(queries.dtype)
        for block in self.blocks:
            queries = block(queries, collab, collab_mask)
        return self.projection(self.final_norm(queries)), lb_loss, chosen


class LearnedPrefix(nn.Module):
    """Ablation "w/o M-Former" (default reading): L free prefix vectors at the LLM width, the same for every user,
    with no ID-based collaborative information (plain prefix tuning)."""

    def __init__(self, llm_size, n_query_tokens, init_std=0.02):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(n_query_tokens, llm_size) * init_std)

    def forward(self, collab, collab_mask):
        batch = collab.size(0)
        prefix = self.tokens.unsqueeze(0).expand(batch, -1, -1)
        return prefix, prefix.new_zeros(()), torch.zeros(batch, dtype=torch.long, device=collab.device)


class LinearPrefix(nn.Module):
    """Ablation "w/o M-Former" with ``no_mformer_prefix: linear``: the SR's user state (its state at the last real
    item) projected linearly to L prefix tokens, as the linear-projection baselines the paper compares against
    (CoLLM-style)."""

    def __init__(self, collab_size, llm_size, n_query_tokens):
        super().__init__()
        self.n_query_tokens = n_query_tokens
        self.projection = nn.Linear(collab_size, n_query_tokens * llm_size)

    def forward(self, collab, collab_mask):
        collab_mask = collab_mask.bool()
        last = (collab_mask.long().cumsum(dim=1).argmax(dim=1))  # index of the last real item
        user = collab[torch.arange(collab.size(0), device=collab.device), last]
        prefix = self.projection(user).view(collab.size(0), self.n_query_tokens, -1)
        return prefix, prefix.new_zeros(()), torch.zeros(collab.size(0), dtype=torch.long, device=collab.device)
