"""
PAUP
################################################

Reference:
    Yuehua Zhu et al. "Progressive Self-Attention Network with Unsymmetrical Positional Encoding for
    Sequential Recommendation." in SIGIR 2022.

Written for RecBole 1.2.1 from the paper and the public description of its code (YuehuaZhu/PAUP).

Per layer, one multi-head attention with two branches whose outputs are summed (as the paper's code does):

* progressive (item) branch: queries come from every position; keys and values are first pooled to
  ``seg_num`` segments by a two-layer strided 1-D convolution (``DownConv``: kernel = stride = ``kernel_size``
  with ``hidden_size // channel_reduction`` channels, ReLU, then kernel = stride = k2 back to ``hidden_size``).
* unsymmetrical positional branch: scores from query/key projections of LN(P + H) (P learned positions,
  H the layer input) weight the UN-pooled values.

Choices where the paper/code is silent, or where we differ from the reference code on purpose:

* Segment geometry. n = MAX_ITEM_LIST_LENGTH, k1 = ``kernel_size``, m = ``seg_num``.
  The sequence is zero-padded at the end to n1 * k1 positions, n1 = ceil(n / k1) first-level blocks;
  k2 = ceil(n1 / m); the blocks are zero-padded at the end to m * k2, so the second conv gives exactly m
  segments, segment j spanning positions [j * k1 * k2, (j + 1) * k1 * k2). With n=50, k1=10, m=4:
  n1=5, k2=2, spans of 20 positions, the last segment starts at 60 >= n so it is empty and always masked.
  Settings that cannot give m segments of real blocks raise a ValueError naming the key: k1 > n, or
  m > n1 (more segments than first-level blocks; e.g. the project's MAX_ITEM_LIST_LENGTH=20 with k1=10, m=4
  gives n1=2, so use kernel_size <= 5 there).
* Causality (a choice, not a leakage fix). The reference code has no causal mask: each history position
  attends over the whole history. In RecBole's prefix instances the target is never in the history, so that
  leaks nothing; we make every position causal, as SASRec is, which changes the model in layers >= 2 (a
  history position no longer sees later history items). The query at position t attends to segments 0..s(t),
  s(t) = t // (k1 * k2), of DownConv applied to the prefix x[0..t] with everything after t zeroed. Segments
  before s(t) only contain positions < t and equal the pooled full sequence; the current segment s(t) is
  computed per position in closed form (the first conv is linear, so a partial block is a running sum inside its
  block), see ``CausalDownConv``.
  Later segments are masked. The positional branch uses a causal mask over positions.
* Padding (RecBole pads at the end, id 0): key/value projections at padded positions are zeroed before
  pooling and padded positions are masked out of the positional attention, so they never reach a real
  position (with right padding causality alone would already exclude them).
* Softmax over keys (the paper's code normalises over queries, ``dim=-2``; over keys is the usual attention
  and keeps the causal reading above).
* Positional scores: ``pos_score_scaling: official`` (default) scales them as the reference code does, by
  (2 d)^-1/2 on the queries and d^-1/2 again on the scores (d = head size); ``single`` keeps only (2 d)^-1/2,
  sqrt(d) times sharper (5.7x at d = 32).
* Padding of the last block: the reference code pads the second convolution's input symmetrically
  (ceil((k2 * m - n1) / 2) blocks on each side), which shifts the segment boundaries off the block grid; we pad
  at the end only, so segment j starts at block j * k2 and the causal per-position segment above stays a running
  sum inside aligned blocks. The segments are the same when k2 * m = n1 (no padding), as at the paper's n=50,
  k1=10, m=5 grid of the reference code's defaults; they differ by where the empty blocks sit otherwise.
* Dropout: 0.2 on hidden states and attention, the reference code's PAUP.yaml.
"""

import math

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.layers import FeedForward
from recbole.model.loss import BPRLoss
from recbole.utils import InputType
from torch import nn

from recbole_llm.core.config import apply_plugin_defaults
from recbole_llm.core.errors import ConfigError
from recbole_llm.core.validation import POSITIVE_INT, check_model_config, check_softmax_training


POS_SCORE_SCALINGS = ("official", "single")


def segment_geometry(max_seq_length, kernel_size, seg_num):
    """(n1 first-level blocks, k2 second conv kernel/stride) giving exactly ``seg_num`` segments.

    Raises ValueError naming the config key when there are fewer first-level blocks than segments.
    """
    if kernel_size < 1 or seg_num < 1:
        raise ValueError(f"PAUP: 'kernel_size' ({kernel_size}) and 'seg_num' ({seg_num}) must be >= 1.")
    if kernel_size > max_seq_length:
        raise ValueError(f"PAUP: 'kernel_size' ({kernel_size}) must be <= MAX_ITEM_LIST_LENGTH ({max_seq_length}).")
    n1 = math.ceil(max_seq_length / kernel_size)
    if seg_num > n1:
        raise ValueError(
            f"PAUP: 'seg_num' ({seg_num}) must be <= ceil(MAX_ITEM_LIST_LENGTH / kernel_size) = "
            f"ceil({max_seq_length} / {kernel_size}) = {n1}; lower 'seg_num' or 'kernel_size'."
        )
    return n1, math.ceil(n1 / seg_num)


class CausalDownConv(nn.Module):
    """Two strided convolutions pooling a sequence to ``seg_num`` segments, full and per-position causal.

    ``forward(x)`` with x [B, n, H] (padding already zeroed) returns
    ``full`` [B, m, H]: DownConv(x) (the paper's pooled keys/values), and
    ``current`` [B, n, H]: for each t, segment s(t) of DownConv(x with positions > t zeroed).
    """

    def __init__(self, max_seq_length, hidden_size, seg_num, kernel_size, channel_reduction):
        super().__init__()
        self.n = max_seq_length
        self.k1 = kernel_size
        self.m = seg_num
        self.n1, self.k2 = segment_geometry(max_seq_length, kernel_size, seg_num)
        if hidden_size // channel_reduction < 1:
            raise ValueError(
                f"PAUP: 'channel_reduction' ({channel_reduction}) must be <= hidden_size ({hidden_size})."
            )
        inner = hidden_size // channel_reduction  # narrow middle channels avoid over-parameterisation
        self.conv1 = nn.Conv1d(hidden_size, inner, kernel_size=self.k1, stride=self.k1)
        self.conv2 = nn.Conv1d(inner, hidden_size, kernel_size=self.k2, stride=self.k2)

    @property
    def segment_span(self):
        return self.k1 * self.k2

    def forward(self, x):
        batch, n, _ = x.shape
        blocks = self.m * self.k2
        x = F.pad(x, (0, 0, 0, blocks * self.k1 - n)).view(batch, blocks, self.k1, -1)
        # per-position contribution to its first-level block: W1[:, :, offset] x_p        [B, N1, k1, r]
        contrib = torch.einsum("bnkd,rdk->bnkr", x, self.conv1.weight)
        bias1 = self.conv1.bias
        h1_full = torch.relu(contrib.sum(2) + bias1)  # [B, N1, r]
        h1_partial = torch.relu(contrib.cumsum(2) + bias1).flatten(1, 2)  # block cut after p   [B, L, r]
        h1_empty = torch.relu(bias1)  # a block whose positions are all zeroed                  [r]

        w2 = self.conv2.weight  # [H, r, k2]
        offset_full = h1_full.view(batch, self.m, self.k2, -1)
        g_full = torch.einsum("bmkr,hrk->bmkh", offset_full, w2)  # [B, m, k2, H]
        full = g_full.sum(2) + self.conv2.bias

        # current segment of position t = bias + earlier blocks of its segment (complete)
        #   + its own block cut after t + later blocks of its segment (empty)
        before = (g_full.cumsum(2) - g_full).flatten(1, 2)  # exclusive running sum      [B, N1, H]
        g_empty = torch.einsum("r,hrk->kh", h1_empty, w2)  # [k2, H]
        after = g_empty.flip(0).cumsum(0).flip(0) - g_empty  # exclusive suffix sum      [k2, H]
        pos = torch.arange(n, device=x.device)
        block = pos // self.k1
        offset = block % self.k2
        own = torch.einsum("bnr,hrn->bnh", h1_partial[:, :n], w2[:, :, offset])
        current = self.conv2.bias + before[:, block] + own + after[offset]
        return full, current

    def segment_of(self, positions):
        return positions // self.segment_span


class ProgressiveUnsymmetricalAttention(nn.Module):
    """Multi-head attention: pooled-segment item branch + positional branch over un-pooled values (summed)."""

    def __init__(self, n_heads, hidden_size, max_seq_length, seg_num, kernel_size, channel_reduction,
                 hidden_dropout_prob, attn_dropout_prob, layer_norm_eps, pos_score_scaling="official"):
        super().__init__()
        if hidden_size % n_heads != 0:
            raise ValueError(f"PAUP: hidden_size ({hidden_size}) must be a multiple of n_heads ({n_heads}).")
        self.n_heads = n_heads
        self.head_size = hidden_size // n_heads

        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.pool_key = CausalDownConv(max_seq_length, hidden_size, seg_num, kernel_size, channel_reduction)
        self.pool_value = CausalDownConv(max_seq_length, hidden_size, seg_num, kernel_size, channel_reduction)

        self.pos_ln = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.pos_query = nn.Linear(hidden_size, hidden_size)
        self.pos_key = nn.Linear(hidden_size, hidden_size)
        # official: the reference code scales the positional queries by (2 d)^-1/2 and the scores again by d^-1/2
        self.pos_scaling = (2.0 * self.head_size) ** -0.5
        if pos_score_scaling == "official":
            self.pos_scaling *= self.head_size ** -0.5

        self.attn_dropout = nn.Dropout(attn_dropout_prob)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out_dropout = nn.Dropout(hidden_dropout_prob)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def heads(self, x):  # [B, T, H] -> [B, heads, T, d]
        return x.view(*x.shape[:-1], self.n_heads, self.head_size).transpose(1, 2)

    def item_branch(self, hidden, keep):
        batch, n, _ = hidden.shape
        q = self.heads(self.query(hidden))  # [B, h, n, d]
        k_full, k_cur = self.pool_key(self.key(hidden) * keep)
        v_full, v_cur = self.pool_value(self.value(hidden) * keep)
        k_full, v_full, k_cur, v_cur = map(self.heads, (k_full, v_full, k_cur, v_cur))

        scale = self.head_size ** -0.5
        scores_full = q @ k_full.transpose(-1, -2) * scale  # [B, h, n, m]
        scores_cur = (q * k_cur).sum(-1, keepdim=True) * scale  # [B, h, n, 1]
        seg_num = k_full.size(2)
        own_segment = self.pool_key.segment_of(torch.arange(n, device=hidden.device)).unsqueeze(1)
        segments = torch.arange(seg_num, device=hidden.device).unsqueeze(0)
        is_current = segments == own_segment  # [n, m]
        # earlier segments: pooled full sequence; own segment: the causal one; later segments: masked
        scores = torch.where(is_current, scores_cur, scores_full).masked_fill(segments > own_segment, -1e4)
        probs = self.attn_dropout(torch.softmax(scores, dim=-1))
        earlier = probs.masked_fill(is_current, 0.0) @ v_full
        own = (probs * is_current).sum(-1, keepdim=True) * v_cur
        return earlier + own  # [B, h, n, d]

    def positional_branch(self, hidden, position_embedding, attention_mask):
        pos = self.pos_ln(hidden + position_embedding)
        q = self.heads(self.pos_query(pos)) * self.pos_scaling
        k = self.heads(self.pos_key(pos))
        v = self.heads(self.value(hidden))  # the un-pooled values (unsymmetrical: not pooled like the keys)
        probs = self.attn_dropout(torch.softmax(q @ k.transpose(-1, -2) + attention_mask, dim=-1))
        return probs @ v

    def forward(self, hidden, position_embedding, keep, attention_mask):
        context = self.item_branch(hidden, keep) + self.positional_branch(hidden, position_embedding, attention_mask)
        context = context.transpose(1, 2).flatten(2)
        return self.LayerNorm(self.out_dropout(self.dense(context)) + hidden)


class PAUPLayer(nn.Module):
    """Post-LN block: progressive attention -> add & norm -> feed-forward -> add & norm."""

    def __init__(self, n_heads, hidden_size, inner_size, max_seq_length, seg_num, kernel_size, channel_reduction,
                 hidden_dropout_prob, attn_dropout_prob, hidden_act, layer_norm_eps, pos_score_scaling="official"):
        super().__init__()
        self.attention = ProgressiveUnsymmetricalAttention(
            n_heads, hidden_size, max_seq_length, seg_num, kernel_size, channel_reduction,
            hidden_dropout_prob, attn_dropout_prob, layer_norm_eps, pos_score_scaling,
        )
        self.feed_forward = FeedForward(hidden_size, inner_size, hidden_dropout_prob, hidden_act, layer_norm_eps)

    def forward(self, hidden, position_embedding, keep, attention_mask):
        return self.feed_forward(self.attention(hidden, position_embedding, keep, attention_mask))


class PAUP(SequentialRecommender):
    r"""PAUP: progressive (segment-pooled) self-attention plus unsymmetrical positional attention.

    Subclasses may override ``embed_items`` (e.g. to concatenate knowledge vectors, projected back to
    ``hidden_size``) and ``candidate_item_embeddings`` (the vectors scored against the sequence output).
    """

    # RecBole's own Config reads input_type from the class, or else needs loss_type, which it cannot know for a
    # plugin model (its YAML is applied at model init). CE = pointwise; the plugin Config switches to pairwise
    # data when loss_type is BPR (``input_type_follows_loss_type``).
    input_type = InputType.POINTWISE
    input_type_follows_loss_type = True

    CHOICES = {"pos_score_scaling": POS_SCORE_SCALINGS}  # recbole_llm.core.validation reads these
    RANGES = {"seg_num": POSITIVE_INT, "kernel_size": POSITIVE_INT}

    def __init__(self, config, dataset):
        apply_plugin_defaults(config, "PAUP")  # stock RecBole Config does not know the plugin YAML
        check_softmax_training(config, type(self).__name__, softmax_loss=config["loss_type"] == "CE")
        check_model_config(config, PAUP)  # again here (a config built by stock RecBole's Config): PAUP's own keys
        if config["loss_type"] == "BPR" and config["MODEL_INPUT_TYPE"] != InputType.PAIRWISE:
            raise ConfigError(f"{type(self).__name__} with loss_type BPR needs pairwise training data, which RecBole's "
                              "own Config cannot know to build for a plugin model: run it through recbole_llm "
                              "(run_recbole_llm.py or recbole_llm.Config).")
        super(PAUP, self).__init__(config, dataset)

        self.n_layers = config["n_layers"]
        self.n_heads = config["n_heads"]
        self.hidden_size = config["hidden_size"]  # same as embedding_size
        self.inner_size = config["inner_size"]
        self.seg_num = config["seg_num"]
        self.kernel_size = config["kernel_size"]
        self.channel_reduction = config["channel_reduction"]
        self.hidden_dropout_prob = config["hidden_dropout_prob"]
        self.attn_dropout_prob = config["attn_dropout_prob"]
        self.hidden_act = config["hidden_act"]
        self.layer_norm_eps = config["layer_norm_eps"]
        self.initializer_range = config["initializer_range"]
        self.loss_type = config["loss_type"]

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.layers = nn.ModuleList(
            PAUPLayer(self.n_heads, self.hidden_size, self.inner_size, self.max_seq_length, self.seg_num,
                      self.kernel_size, self.channel_reduction, self.hidden_dropout_prob,
                      self.attn_dropout_prob, self.hidden_act, self.layer_norm_eps, config["pos_score_scaling"])
            for _ in range(self.n_layers)
        )
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=self.layer_norm_eps)
        self.dropout = nn.Dropout(self.hidden_dropout_prob)

        if self.loss_type == "BPR":
            self.loss_fct = BPRLoss()
        elif self.loss_type == "CE":
            self.loss_fct = nn.CrossEntropyLoss()
        else:
            raise NotImplementedError("Make sure 'loss_type' in ['BPR', 'CE']!")

        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def embed_items(self, item_seq):
        """Item vectors [B, n, hidden_size] fed to the encoder (no absolute position added: PAUP keeps
        positions in its own branch). Override to enrich items; the result must stay hidden_size wide."""
        return self.item_embedding(item_seq)

    def candidate_item_embeddings(self, items=None):
        """Vectors the sequence output is scored against: all items ([n_items, H]) or ``items``."""
        return self.item_embedding.weight if items is None else self.item_embedding(items)

    def attention_mask(self, item_seq):
        """Additive [B, 1, n, n] mask: key p is visible to query t when p <= t and p is not padding."""
        n = item_seq.size(1)
        causal = torch.ones(n, n, dtype=torch.bool, device=item_seq.device).tril()
        visible = causal & (item_seq != 0).unsqueeze(1)  # [B, n, n]
        mask = torch.zeros(visible.shape, dtype=torch.float, device=item_seq.device)
        return mask.masked_fill(~visible, -1e4).unsqueeze(1)

    def sequence_output(self, item_seq, item_seq_len=None):
        """Encoder output at every position [B, n, H]; only positions < item_seq_len are meaningful."""
        if item_seq.size(1) > self.max_seq_length:
            raise ValueError(
                f"PAUP: sequence length {item_seq.size(1)} exceeds MAX_ITEM_LIST_LENGTH {self.max_seq_length}."
            )
        hidden = self.dropout(self.LayerNorm(self.embed_items(item_seq)))
        position_ids = torch.arange(item_seq.size(1), device=item_seq.device)
        position_embedding = self.position_embedding(position_ids).unsqueeze(0)
        keep = (item_seq != 0).unsqueeze(-1).to(hidden.dtype)
        attention_mask = self.attention_mask(item_seq)
        for layer in self.layers:
            hidden = layer(hidden, position_embedding, keep, attention_mask)
        return hidden

    def forward(self, item_seq, item_seq_len):
        output = self.sequence_output(item_seq, item_seq_len)
        return self.gather_indexes(output, item_seq_len - 1)  # [B H]

    def calculate_loss(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        seq_output = self.forward(item_seq, item_seq_len)
        pos_items = interaction[self.POS_ITEM_ID]
        if self.loss_type == "BPR":
            neg_items = interaction[self.NEG_ITEM_ID]
            pos_score = torch.sum(seq_output * self.candidate_item_embeddings(pos_items), dim=-1)
            neg_score = torch.sum(seq_output * self.candidate_item_embeddings(neg_items), dim=-1)
            return self.loss_fct(pos_score, neg_score)
        logits = torch.matmul(seq_output, self.candidate_item_embeddings().transpose(0, 1))
        return self.loss_fct(logits, pos_items)

    def predict(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        seq_output = self.forward(item_seq, item_seq_len)
        test_item_emb = self.candidate_item_embeddings(interaction[self.ITEM_ID])
        return torch.mul(seq_output, test_item_emb).sum(dim=1)  # [B]

    def full_sort_predict(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        seq_output = self.forward(item_seq, item_seq_len)
        return torch.matmul(seq_output, self.candidate_item_embeddings().transpose(0, 1))  # [B n_items]
