"""The LLM side of SeRALM's alignment objective (paper 4.4, Eq. 6-8), as pure tensor math.

Notation (one training batch, B instances, U sampled knowledge texts):
- ``logp_rec_s`` [B]: log p(y|x,s) from the recommender that sees the sampled knowledge s;
- ``logp_rec_base`` [B]: log p(y|x) from the frozen recommender pre-trained without knowledge;
- ``token_logps`` list of U tensors [T_u]: log p_align(s_u,t | x, s_u,<t) under the current LLM (with grad);
- ``orig_token_logps`` list of U tensors [T_u]: the same tokens scored by the original LLM (no grad);
- ``membership`` [B, U] 0/1: which sampled texts belong to which instance (s of an instance is the set
  of texts sampled for its items, so log p(s|x) = sum of those texts' log-probs).

Descending ``alignment_llm_loss`` performs the update of Eq. 8:
    grad = - mean_b  w_b * grad log p_align(s_b|x_b)            (Eq. 6, one Monte-Carlo sample)
           + alpha * grad KL(p_align || p_orig)                 (Eq. 7, per token)
with w_b = p(y|x,s)/p(y|x) detached (a weight, not a path for gradients: the recommender is not
differentiated through, as the paper requires).
"""

import torch


def importance_weights(logp_rec_s, logp_rec_base, ratio_clip=None):
    """w = p(y|x,s) / p(y|x), detached; computed in log space (both probabilities are tiny).

    ratio_clip: None (paper: no clipping) or an upper bound on w, a variance guard for small data.
    """
    logw = (logp_rec_s.detach().float() - logp_rec_base.detach().float())
    weights = torch.exp(logw)
    if ratio_clip is not None:
        if ratio_clip <= 0:
            raise ValueError(f"ratio_clip must be a positive number or None, got {ratio_clip!r}.")
        weights = weights.clamp(max=float(ratio_clip))
    return weights


BASELINES = ("leave_one_out", "none")


def subtract_baseline(weights, baseline="leave_one_out"):
    """The policy-gradient weights with a baseline subtracted (a variance reduction that keeps the estimator
    unbiased): ``leave_one_out`` subtracts from each w_b the mean of the other instances' weights (it does not
    depend on s_b, so E[grad log p(s_b)] * baseline = 0); ``none`` leaves w as the paper writes it. A batch of one
    has no other instance: its weight is kept."""
    if baseline not in BASELINES:
        raise ValueError(f"align_baseline must be one of {BASELINES}, got {baseline!r}.")
    if baseline == "none" or weights.numel() < 2:
        return weights
    others = (weights.sum() - weights) / (weights.numel() - 1)
    return weights - others


def sequence_sums(token_logps):
    """log p(s_u|x) = sum of per-token log-probs, for each of the U texts -> [U]."""
    if len(token_logps) == 0:
        raise ValueError("token_logps is empty: no knowledge text was sampled for this batch.")
    return torch.stack([t.sum() for t in token_logps])


def per_token_kl(token_logps, orig_token_logps, estimator="k2"):
    """Per-token KL(p_align || p_orig) estimate on the sampled tokens, summed per text -> [U].

    The paper writes L_KL = E[log p_orig(s|x) - log p_align(s|x)] (Eq. 7) and adds alpha * grad L_KL.
    Differentiating that sampled difference directly ("k1") gives -grad log p_align(s), a gradient that is
    not zero even when the two LLMs are identical. The default "k2" = 0.5 * (log p_align - log p_orig)^2
    per token has the same value sign-free, is exactly zero with zero gradient when the LLMs agree, and its
    gradient (log p_align - log p_orig) * grad log p_align is the score-function gradient of the KL on
    tokens sampled from p_align. "k3" = r - 1 - log r with r = p_orig / p_align is also offered.
    """
    out = []
    for cur, orig in zip(token_logps, orig_token_logps):
        orig = orig.detach().to(cur.device, cur.dtype)
        if cur.shape != orig.shape:
            raise ValueError(f"token log-prob shapes differ: current {tuple(cur.shape)} vs original "
                             f"{tuple(orig.shape)}.")
        diff = cur - orig  # log p_align - log p_orig
        if estimator == "k1":
            kl = diff
        elif estimator == "k2":
            kl = 0.5 * diff.pow(2)
        elif estimator == "k3":
            kl = torch.exp(-diff) - 1 + diff
        else:
            raise ValueError(f"kl_estimator must be one of 'k1', 'k2', 'k3', got {estimator!r}.")
        out.append(kl.sum())
    return torch.stack(out)


def alignment_llm_loss(token_logps, orig_token_logps, weights, membership, alpha, kl_estimator="k2",
                       baseline="none"):
    """Loss whose gradient-descent step is the LLM update of Eq. 8; returns (loss, stats dict).

    weights [B] (detached importance weights), membership [B, U] (float 0/1); ``baseline``: see
    :func:`subtract_baseline`.
    The policy term is averaged over the B instances (the batch estimate of sum over D); the KL term is
    averaged over the U sampled texts.
    """
    seq_logp = sequence_sums(token_logps)  # [U]
    membership = membership.to(seq_logp.device, seq_logp.dtype)
    weights = weights.detach().to(seq_logp.device, seq_logp.dtype)
    if membership.shape != (weights.numel(), seq_logp.numel()):
        raise ValueError(f"membership must be [B={weights.numel()}, U={seq_logp.numel()}], "
                         f"got {tuple(membership.shape)}.")
    instance_logp = membership @ seq_logp  # log p(s_b|x_b) per instance [B]
    advantages = subtract_baseline(weights, baseline)
    policy = -(advantages * instance_logp).mean()
    kl = per_token_kl(token_logps, orig_token_logps, kl_estimator)
    kl_term = kl.mean()
    loss = policy + alpha * kl_term
    with torch.no_grad():
        k1 = torch.stack([(c.detach() - o.detach().to(c.device, c.dtype)).sum()
                          for c, o in zip(token_logps, orig_token_logps)]).mean()
    stats = {
        "policy_loss": float(policy.detach()),
        "kl": float(k1),  # plain sampled estimate of KL(p_align || p_orig) per text
        "kl_penalty": float(kl_term.detach()),
        "weight_mean": float(weights.mean()),
        "weight_max": float(weights.max()),
        "advantage_std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
        "logp_s_mean": float(seq_logp.detach().mean()),
    }
    return loss, stats


def membership_matrix(instance_items, unique_items):
    """[B, U] 0/1 matrix: row b marks the sampled texts (one per unique item) of instance b's items.

    instance_items: list of B lists of item ids; unique_items: list of U item ids (one text each).
    """
    column = {int(item): u for u, item in enumerate(unique_items)}
    matrix = torch.zeros(len(instance_items), len(unique_items))
    for b, items in enumerate(instance_items):
        for item in items:
            matrix[b, column[int(item)]] = 1.0
    return matrix
