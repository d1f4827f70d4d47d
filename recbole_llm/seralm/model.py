# -*- coding: utf-8 -*-
r"""
SeRALM knowledge-enhanced sequential recommenders
################################################

Reference:
    Enhancing Sequential Recommenders with Augmented Knowledge from Aligned Large Language Models (SeRALM).

The base models (Caser, SASRec, PAUP, LightSANs) are unchanged except for their item vectors (paper 4.3:
"concatenated with the item ID embedding"). Every one of them reads items only through
``self.item_embedding(ids)`` and ``self.item_embedding.weight`` (sequence inputs, CE candidates,
full_sort_predict, Caser's L2 term), so we swap that one module for :class:`KnowledgeItemEmbedding`,
which returns ``[ID embedding ; Linear(knowledge vector)]`` for given ids and the full table as
``.weight``; no forward code of the base models is copied.

Design choice (the paper does not give sizes), ``knowledge_concat``:
- ``split`` (default): the concatenation keeps the base model's width. The ID part is
  ``width - knowledge_proj_size`` wide and the projected knowledge ``knowledge_proj_size``, so every layer after
  the embedding is exactly the base model's (same cost; the ID embedding is narrower than Base's).
- ``widen``: the ID embedding keeps the base width and the knowledge is appended, the literal reading of
  "concatenated with the item ID embedding"; the model is built ``knowledge_proj_size`` wider than the config's
  ``hidden_size`` (``embedding_size`` for Caser), which the config keeps as the user wrote it.

Knowledge vectors (text-encoder outputs, [n_items, d_text]) are a buffer filled at construction from
:func:`recbole_llm.seralm.knowledge.knowledge_matrix` (cached; the LLM is never run at recommendation
time) and saved in the checkpoint's state_dict. With ``train_text_encoder`` the encoder and the knowledge
texts it re-reads are saved there too, so an aligned checkpoint carries the aligned texts.
"""

import contextlib

import torch
import torch.nn.functional as F
from recbole.utils import InputType
from torch import nn

from recbole.model.sequential_recommender.caser import Caser
from recbole.model.sequential_recommender.lightsans import LightSANs
from recbole.model.sequential_recommender.sasrec import SASRec

from recbole_llm.core.config import apply_plugin_defaults
from recbole_llm.core.keys import seralm_get
# loader and knowledge (below) are called through their modules, so tests that monkeypatch
# knowledge.knowledge_matrix or loader.load_text_encoder reach these calls
from recbole_llm.llm import loader
from recbole_llm.paup.model import PAUP
from recbole_llm.seralm import knowledge
from recbole_llm.seralm.alignment.loss import BASELINES
from recbole_llm.seralm.knowledge import GROUNDINGS, KNOWLEDGE_SOURCES, knowledge_texts
from recbole_llm.core.validation import (NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, PROBABILITY,
                                         check_model_config, check_softmax_training)

KNOWLEDGE_CONCATS = ("project", "split", "widen")  # see the module docstring
KNOWLEDGE_CANDIDATES = ("id", "fused")
GENERATOR_MODES = ("sync", "ray")  # read by the AlignmentTrainer
KL_ESTIMATORS = ("k1", "k2", "k3")


class KnowledgeItemEmbedding(nn.Module):
    """Drop-in for the base model's ``nn.Embedding``: input vectors with the projected knowledge joined to the ID
    embedding; ``weight`` is the table of candidate vectors the base model scores its output against.

    ``concat``:
    - ``project``: [ID embedding ; Linear(knowledge)] -> Linear to the base width, that last map initialised to
      [I ; 0], so at initialisation every vector is the ID embedding: the variant computes the base model. The ID
      embedding is the base model's own module (its initialisation is kept). ``candidates``: ``id`` scores against
      the ID embedding (the knowledge alters the input only), ``fused`` against the fused vectors.
    - ``split``: [ID embedding (width - proj_size) ; Linear(knowledge) (proj_size)], inputs and candidates.
    - ``widen``: as split with the ID embedding at the base width (the caller builds the base model wider).
    The padding item (id 0) is the base model's padding row with ``project``, all zeros otherwise.
    """

    def __init__(self, base_embedding, knowledge_vectors, proj_size, dropout_prob, concat="project",
                 candidates="id"):
        super().__init__()
        n_items, width = base_embedding.num_embeddings, base_embedding.embedding_dim
        if concat not in KNOWLEDGE_CONCATS:
            raise ValueError(f"knowledge_concat must be one of {KNOWLEDGE_CONCATS}, got {concat!r}")
        if concat != "project" and not 0 < proj_size < width:
            raise ValueError(f"knowledge_proj_size={proj_size} must be between 1 and the item embedding width - 1 "
                             f"({width - 1}) so that the ID embedding keeps some width.")
        if knowledge_vectors.dim() != 2 or knowledge_vectors.size(0) != n_items:
            raise ValueError(f"knowledge vectors must be [n_items={n_items}, d_text], got {tuple(knowledge_vectors.shape)}.")
        self.concat = concat
        self.candidates = candidates if concat == "project" else "fused"
        self.num_embeddings = n_items
        self.embedding_dim = width
        if concat == "project":
            self.id_embedding = base_embedding
            self.fusion = nn.Linear(width + proj_size, width)
        else:
            self.id_embedding = nn.Embedding(n_items, width - proj_size, padding_idx=0)
            self.fusion = None
        self.knowledge_projection = nn.Linear(knowledge_vectors.size(1), proj_size)
        self.knowledge_dropout = nn.Dropout(dropout_prob)
        self.register_buffer("knowledge_vectors", knowledge_vectors.detach().float().clone())
        self.override = None  # a [n_items, d_text] matrix used instead of the buffer for one call

    def reset_fusion(self):
        """The fusion map to [I ; 0] (exactly the ID embedding); called after the base model's weight init."""
        if self.fusion is not None:
            with torch.no_grad():
                self.fusion.weight.zero_()
                self.fusion.weight[:, :self.embedding_dim].copy_(torch.eye(self.embedding_dim))
                self.fusion.bias.zero_()

    def knowledge_table(self):
        return self.knowledge_vectors if self.override is None else self.override

    def _combine(self, id_emb, knowledge, items):
        projected = self.knowledge_projection(self.knowledge_dropout(knowledge))
        joined = torch.cat([id_emb, projected], dim=-1)
        padding = (items == 0).unsqueeze(-1)
        if self.fusion is not None:  # padding keeps the base model's own padding row, whatever its init made of it
            return torch.where(padding, id_emb, self.fusion(joined))
        return joined.masked_fill(padding, 0.0)

    def fused_table(self):
        items = torch.arange(self.num_embeddings, device=self.id_embedding.weight.device)
        return self._combine(self.id_embedding.weight, self.knowledge_table(), items)

    def forward(self, items):
        # Projecting the whole table then indexing is cheaper than projecting every position of a batch
        # (n_items rows vs batch x length rows) and gives the same vectors.
        return self.fused_table()[items]

    @property
    def weight(self):
        """Candidate vectors [n_items, width] (what the base model's CE loss and full_sort_predict score)."""
        return self.id_embedding.weight if self.candidates == "id" else self.fused_table()


class KnowledgeTexts(nn.Module):
    """The knowledge text of every item (by internal id) that a trainable text encoder re-encodes.

    Kept in the state_dict as extra state: alignment replaces the texts (phase C), and a checkpoint or resume
    state must bring back those texts, not the base ones the model was built with."""

    def __init__(self, texts):
        super().__init__()
        self.texts = list(texts)

    def get_extra_state(self):
        return {"texts": list(self.texts)}

    def set_extra_state(self, state):
        texts = state.get("texts") if isinstance(state, dict) else None
        if not isinstance(texts, list) or len(texts) != len(self.texts):
            size = f" of {len(texts)}" if isinstance(texts, list) else ""
            raise ValueError(f"the saved knowledge texts must be a list of {len(self.texts)} strings (one per item "
                             f"id), got {type(texts).__name__}{size}.")
        self.texts = [str(t) for t in texts]


class SeRALMMixin:
    """Adds LLM knowledge to a RecBole sequential model's item vectors; put it first in the bases.

    Config keys (see the model YAMLs): knowledge_proj_size, knowledge_concat, knowledge_dropout, train_text_encoder,
    text_encoder_checkpointing, knowledge_source, knowledge_* generation/encoding settings, llm_path, encoder_path.
    """

    # Always CE (a softmax over all items). Declared so that RecBole's own Config, which does not read the
    # plugin YAML, accepts the model without a loss_type key.
    input_type = InputType.POINTWISE

    # the switches of the knowledge and the alignment (recbole_llm.core.validation reads these)
    CHOICES = {
        "knowledge_source": (*KNOWLEDGE_SOURCES, "checkpoint"),  # checkpoint: the vectors a checkpoint holds
        "knowledge_concat": KNOWLEDGE_CONCATS,
        "knowledge_candidates": KNOWLEDGE_CANDIDATES,
        "knowledge_grounding": GROUNDINGS,
        "generator_mode": GENERATOR_MODES,
        "kl_estimator": KL_ESTIMATORS,
        "align_baseline": BASELINES,  # the loss's (recbole_llm.seralm.alignment.loss)
    }
    RANGES = {
        "alpha": NON_NEGATIVE,
        "refresh_every": POSITIVE_INT,
        "align_resume_every": NON_NEGATIVE_INT,
        "knowledge_batch_size": POSITIVE_INT,
        "knowledge_max_new_tokens": POSITIVE_INT,
        "knowledge_proj_size": POSITIVE_INT,
        "knowledge_dropout": PROBABILITY,
        "lora_r": POSITIVE_INT,
        "llm_learning_rate": POSITIVE,
    }

    @classmethod
    def run_inputs(cls, config):
        """What a run loads besides the atomic files (checked by recbole_llm.run.preflight before anything is written):
        item text + encoder for any knowledge source but ``checkpoint``, the LLM to generate or align it, Ray
        for the asynchronous generator."""
        source = config["knowledge_source"]
        needs = {"item_text", "encoder"} if source in ("llm", "item_text") else set()
        if source == "llm":
            needs.add("llm")
        if config["train_text_encoder"]:
            needs.add("encoder")
        if seralm_get(config, "alignment"):  # read by the AlignmentTrainer
            needs |= {"item_text", "llm"}
            if seralm_get(config, "generator_mode") == "ray":
                needs.add("ray")
        return needs

    width_key = "hidden_size"  # the config key of the item vector width (Caser: embedding_size)

    def __init__(self, config, dataset):
        apply_plugin_defaults(config, type(self).__name__)  # stock RecBole Config does not know the plugin YAML
        check_softmax_training(config, type(self).__name__)  # always CE, whatever loss_type says (checked below)
        # again here (a config built by stock RecBole's Config): the knowledge's keys; a base checks its own (PAUP)
        check_model_config(config, SeRALMMixin)
        concat = config["knowledge_concat"]
        if concat == "widen":
            # Build the base model wider for this call only: the config (logged, saved, read by the frozen base
            # of the alignment) keeps the width the user gave, and a reload widens again from it.
            width = int(config[self.width_key])
            config[self.width_key] = width + int(config["knowledge_proj_size"])
            try:
                super().__init__(config, dataset)
            finally:
                config[self.width_key] = width
        else:
            super().__init__(config, dataset)
        if self.loss_type != "CE":
            raise ValueError(f"{type(self).__name__} needs loss_type: CE (log p(y|x, s) is a softmax over all items); "
                             f"got loss_type={self.loss_type!r}.")
        vectors = self._initial_knowledge(config, dataset)
        base = self.item_embedding
        knowledge_embedding = KnowledgeItemEmbedding(
            base, vectors, int(config["knowledge_proj_size"]), float(config["knowledge_dropout"] or 0.0),
            concat=concat, candidates=config["knowledge_candidates"])
        # The new parts take the base model's init; the base's own ID embedding (project) keeps its weights.
        for module in (knowledge_embedding.knowledge_projection, knowledge_embedding.fusion):
            if module is not None:
                module.apply(self._init_weights)
        if concat != "project":
            knowledge_embedding.id_embedding.apply(self._init_weights)
        knowledge_embedding.reset_fusion()
        self.item_embedding = knowledge_embedding
        self.train_text_encoder = bool(config["train_text_encoder"])
        if self.train_text_encoder:
            self._setup_text_encoder(config, dataset)

    # ------------------------------------------------------------------------------------ knowledge I/O
    def _initial_knowledge(self, config, dataset):
        if config["knowledge_source"] == "checkpoint":
            # Reload without any cache: shape only, the state_dict that follows fills the values.
            dim = config["knowledge_text_dim"]
            if not dim:
                raise ValueError("knowledge_source: checkpoint needs knowledge_text_dim (saved in the checkpoint's config).")
            return torch.zeros(self.n_items, int(dim))
        vectors = knowledge.knowledge_matrix(dataset, config)
        config["knowledge_text_dim"] = int(vectors.size(1))  # recorded in checkpoints for knowledge_source: checkpoint
        return vectors

    @property
    def knowledge_vectors(self):
        """The cached knowledge matrix [n_items, d_text] the model reads (a buffer, saved in checkpoints)."""
        return self.item_embedding.knowledge_vectors

    def set_knowledge_vectors(self, vectors):
        """Replace the whole knowledge matrix, e.g. after regenerating knowledge with the aligned LLM."""
        current = self.item_embedding.knowledge_vectors
        if tuple(vectors.shape) != tuple(current.shape):
            raise ValueError(f"set_knowledge_vectors expects a tensor of shape {tuple(current.shape)} "
                             f"[n_items, d_text], got {tuple(vectors.shape)}.")
        with torch.no_grad():
            current.copy_(vectors.detach().to(current))

    def override_table(self, knowledge_override, base=None):
        """A full [n_items, d_text] table from an override: a full tensor, or {item_id: vector} put over ``base``
        (default: the cached matrix; the trainer passes a freshly encoded one when the encoder trains). No override:
        ``base`` as given (None: the model's own table)."""
        if knowledge_override is None or (isinstance(knowledge_override, dict) and not knowledge_override):
            return base
        base = self.item_embedding.knowledge_vectors if base is None else base
        if isinstance(knowledge_override, dict):
            ids = torch.as_tensor([int(i) for i in knowledge_override], dtype=torch.long, device=base.device)
            rows = torch.stack([torch.as_tensor(v) for v in knowledge_override.values()]).to(base)
            if rows.dim() != 2 or rows.size(1) != base.size(1):
                raise ValueError(f"knowledge_override vectors must each be [d_text={base.size(1)}], got {tuple(rows.shape[1:])}.")
            return base.index_put((ids,), rows)
        if not torch.is_tensor(knowledge_override) or tuple(knowledge_override.shape) != tuple(base.shape):
            raise ValueError(f"knowledge_override must be a dict {{item_id: Tensor[d_text]}} or a tensor of shape "
                             f"{tuple(base.shape)}, got {type(knowledge_override).__name__}.")
        return knowledge_override.to(base)

    @contextlib.contextmanager
    def _knowledge(self, table):
        previous = self.item_embedding.override
        if table is not None:
            self.item_embedding.override = table
        try:
            yield
        finally:
            self.item_embedding.override = previous

    # ---------------------------------------------------------------------------- training / scoring
    def calculate_loss(self, interaction, knowledge_override=None):
        table = self.override_table(knowledge_override)
        if table is None and self.train_text_encoder and self.training:
            table = self.fresh_knowledge_table(interaction)
        with self._knowledge(table):
            return super().calculate_loss(interaction)

    def predict(self, interaction):
        if self.item_embedding.candidates == "fused":
            return super().predict(interaction)
        # The base models embed the scored items with item_embedding(ids), which gives fused input vectors: score
        # them as full_sort_predict does, against the candidate (ID) rows.
        items = interaction[self.ITEM_ID].long().unsqueeze(1)
        return self.full_sort_predict(interaction).gather(1, items).squeeze(1)

    def target_log_prob(self, interaction, knowledge_override=None):
        """log p(y | x, s) [B] of each row's target item under the softmax over all items (as the CE loss)."""
        with self._knowledge(self.override_table(knowledge_override)):
            scores = self.full_sort_predict(interaction)
        target = interaction[self.POS_ITEM_ID].long().unsqueeze(1)
        return torch.log_softmax(scores, dim=-1).gather(1, target).squeeze(1)

    # ------------------------------------------------------------------------ trainable text encoder
    # train_text_encoder: True (paper 4.3, "the text encoder is jointly optimized"): each training step
    # re-encodes, with gradients, the knowledge texts of every distinct item in the batch (sequences +
    # targets); the other candidates keep their cached vectors, and those rows are written back to the
    # cache. Cost: one encoder forward+backward over ~all distinct batch items per step (on CPU seconds
    # per step with MiniLM), plus a full re-encode of every item whenever the model switches to eval.
    # Alignment (phase B) also encodes each sampled text with this encoder, with gradients, and phase C hands
    # the aligned texts to set_knowledge_texts.
    def _setup_text_encoder(self, config, dataset):
        if config["knowledge_source"] == "checkpoint":
            texts = [""] * self.n_items  # filled by the state_dict that follows (the saved texts)
        else:
            texts = knowledge_texts(dataset, config)
        self.knowledge_text_store = KnowledgeTexts(texts)
        encoder, tokenizer = loader.load_text_encoder(seralm_get(config, "encoder_path"), device="cpu", dtype="float32")
        for param in encoder.parameters():
            param.requires_grad_(True)
        if seralm_get(config, "text_encoder_checkpointing"):
            _enable_activation_checkpointing(encoder)
        self.text_encoder = encoder
        self.text_tokenizer = tokenizer
        self.encoder_max_length = int(seralm_get(config, "knowledge_encoder_max_length"))
        self._encoder_stale = False

    @property
    def knowledge_texts(self):
        """The texts the trainable encoder reads, by item id ("" for padding)."""
        return self.knowledge_text_store.texts

    def encode_knowledge_texts(self, texts):
        """Sentence vectors [n, d_text] of ``texts`` with the model's own (trainable) encoder, as the cached matrix
        is made (mean pooling, L2 norm, an empty text gives 0); with gradients unless grad is disabled."""
        texts = list(texts)
        cached = self.item_embedding.knowledge_vectors
        vectors = torch.zeros(len(texts), cached.size(1), device=cached.device, dtype=cached.dtype)
        rows = [i for i, text in enumerate(texts) if text.strip()]
        if not rows:  # the encoder cannot read an all-empty batch (zero tokens with some tokenizers)
            return vectors
        batch = self.text_tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                    max_length=self.encoder_max_length, return_tensors="pt").to(cached.device)
        states = self.text_encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        encoded = F.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        return vectors.index_put((torch.as_tensor(rows, device=cached.device),), encoded.to(vectors.dtype))

    def fresh_knowledge_table(self, interaction):
        """The knowledge matrix with the batch's items (histories + targets) re-encoded with gradients; their
        rows are also written back to the cached matrix."""
        items = torch.cat([interaction[self.ITEM_SEQ].flatten(), interaction[self.POS_ITEM_ID].flatten()])
        items = [i for i in torch.unique(items).tolist() if i != 0]
        fresh = self.encode_knowledge_texts([self.knowledge_texts[i] for i in items])
        ids = torch.as_tensor(items, device=fresh.device)
        with torch.no_grad():
            self.item_embedding.knowledge_vectors[ids] = fresh.detach()
        self._encoder_stale = True
        return self.item_embedding.knowledge_vectors.index_put((ids,), fresh)

    @torch.no_grad()
    def refresh_knowledge_vectors(self, batch_size=64):
        """Re-encode every item's knowledge with the current (fine-tuned) text encoder, its dropout off."""
        was_training = self.text_encoder.training
        self.text_encoder.eval()
        try:
            texts = self.knowledge_texts
            rows = [self.encode_knowledge_texts(texts[start:start + batch_size])
                    for start in range(1, self.n_items, batch_size)]
        finally:
            self.text_encoder.train(was_training)
        vectors = torch.cat([torch.zeros_like(rows[0][:1]), *rows]).detach()
        self.set_knowledge_vectors(vectors)
        self._encoder_stale = False

    def set_knowledge_texts(self, texts):
        """Replace every item's knowledge text (e.g. the aligned LLM's, phase C) and re-encode all of them with the
        model's own encoder, which has been trained with the model."""
        if not self.train_text_encoder:
            raise RuntimeError("set_knowledge_texts needs train_text_encoder: True; otherwise encode the texts and "
                               "call set_knowledge_vectors.")
        texts = list(texts)
        if len(texts) != self.n_items:
            raise ValueError(f"set_knowledge_texts expects {self.n_items} texts (one per item id, padding first), "
                             f"got {len(texts)}.")
        self.knowledge_text_store.texts = texts
        self.refresh_knowledge_vectors()

    def train(self, mode=True):
        result = super().train(mode)
        if not mode and getattr(self, "train_text_encoder", False) and getattr(self, "_encoder_stale", False):
            self.refresh_knowledge_vectors()  # after switching: the encoder's dropout is off
        return result


def _enable_activation_checkpointing(encoder):
    """Keep only each layer's input for the backward pass and recompute the rest: the encoder's activations for every
    batch item's text are the memory peak of ``train_text_encoder``. Non-reentrant, so the frozen-input case still
    gives the weights their gradients."""
    if not getattr(encoder, "supports_gradient_checkpointing", False):
        raise ValueError(f"text_encoder_checkpointing: True, but the text encoder ({type(encoder).__name__}) does not "
                         "support activation checkpointing.")
    kwargs = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):  # the name from transformers 5.x on
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class CaserSeRALM(SeRALMMixin, Caser):
    r"""Caser with SeRALM knowledge concatenated to its item embeddings."""

    width_key = "embedding_size"


class SASRecSeRALM(SeRALMMixin, SASRec):
    r"""SASRec with SeRALM knowledge concatenated to its item embeddings."""


class PAUPSeRALM(SeRALMMixin, PAUP):
    r"""PAUP with SeRALM knowledge concatenated to its item embeddings."""


class LightSANsSeRALM(SeRALMMixin, LightSANs):
    r"""LightSANs with SeRALM knowledge concatenated to its item embeddings."""
