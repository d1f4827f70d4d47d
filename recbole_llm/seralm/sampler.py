"""SeRALM's generator job (paper 4.4, "Asynchronous generation during training", Figure 4).

For a training batch (x, y) the generator job (Algorithm 1, lines 3-4):
  1. samples knowledge s for the batch's items from the LLM with its adapter SNAPSHOT theta_l';
  2. scores s under the original LLM (adapter disabled): per-token log p_orig(s|x), for the KL penalty;
  3. encodes s with the text encoder and computes log p(y|x,s) with the recommender SNAPSHOT theta_r';
  4. computes log p(y|x) with the frozen recommender pre-trained without knowledge.
The trainer job (lines 5-6) consumes these batches and sends a new snapshot every ``refresh_every``
trainer steps (paper: 50; the slow_refresh ablation: 3000). With ``refresh_every: 1`` and the sync
generator this is Algorithm 1 exactly.

Which items get sampled knowledge: the paper samples "one s from p(s|x)" where x is the history; we
sample one text for each of the ``align_history_items`` most recent history items of every instance
(default 1: the last item). Instances of a batch that share an item share that item's sample (one draw
per distinct item and batch); log p(s|x) of an instance is the sum over its items' texts. p(y|x,s) of an
instance sees only its own samples (Eq. 6 is per instance: with one batch-wide override, another row's
sample of the target or of a strong candidate would move this row's weight); rows that sampled the same
items share one recommender pass (``by_sampled_items``).

Two interchangeable jobs:
- ``SyncGenerator``: same process, computes a batch when the trainer asks for it, with the snapshot
  (debugging, deterministic);
- ``RayGenerator``: a Ray actor holding its own LLM, recommender and frozen recommender; it receives
  snapshots as state dicts (LoRA parameters only for the LLM) and works through submitted batches
  while the trainer trains. Ray is imported only here.

With ``train_text_encoder`` the text encoder belongs to the recommender, so a snapshot carries it and the
generator encodes s with the snapshot's encoder (the one p(y|x,s) is computed with); otherwise it encodes
with the config's fixed encoder, exactly as the knowledge matrix was encoded.
"""

import contextlib
import copy
import logging
from collections import deque

import torch
import torch.nn.functional as F

from recbole_llm.core.keys import seralm_get
from recbole_llm.seralm.knowledge import encode_texts, ground, item_source_texts, knowledge_prompts
# called as loader.load_text_encoder, so tests that monkeypatch it reach this call
from recbole_llm.llm import loader
from recbole_llm.llm.generate import generate_with_ids, sequence_logprobs
from recbole_llm.llm.lora import build_lora_llm, state_digest
from recbole_llm.llm.workers import start_ray, stop_ray
from recbole_llm.seralm.alignment.loss import membership_matrix

logger = logging.getLogger(__name__)


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@contextlib.contextmanager
def swapped_lora(model, snapshot_params):
    """Temporarily put the snapshot's LoRA values into ``model`` (same process, no second LLM copy)."""
    params = _lora_params(model)
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(snapshot_params[n])
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


# ------------------------------------------------------------------------------------ recommenders
def base_log_prob(model, interaction):
    """log p(y|x) under a plain RecBole sequential model: log-softmax of its full-ranking scores, read at
    the target item. Same normalisation as SeRALMMixin.target_log_prob (all item ids, padding included,
    whose zero vector scores 0 in both), so the ratio p(y|x,s)/p(y|x) compares like with like."""
    scores = model.full_sort_predict(interaction).float()
    scores = scores.view(interaction[model.POS_ITEM_ID].size(0), -1)
    target = interaction[model.POS_ITEM_ID].long()
    return F.log_softmax(scores, dim=-1).gather(1, target.unsqueeze(1)).squeeze(1)


def select_history_items(item_seq, item_seq_len, count):
    """The ``count`` most recent real items of each (right-padded) history, as lists of ints."""
    out = []
    for row, length in zip(item_seq.tolist(), item_seq_len.tolist()):
        length = int(length)
        items = [i for i in row[max(0, length - count):length] if i != 0]
        out.append(items)
    return out


def cpu_state(state, copy_values=True):
    """A state dict with its tensors on the CPU; other entries (a module's extra state, e.g. knowledge texts) kept.
    ``copy_values``: copies that later changes of the live model cannot reach; False only moves what is elsewhere
    (for a state that is already such a copy)."""
    if not copy_values:
        return {k: v.detach().to("cpu") if torch.is_tensor(v) else v for k, v in state.items()}
    return {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state.items()}


def recommender_copy(model):
    """The generator job's own copy of the recommender. A trainable text encoder's "re-encode every item when
    switched to eval" is cleared on the copy: its knowledge matrix arrives with every snapshot."""
    clone = copy.deepcopy(model)
    if getattr(clone, "_encoder_stale", False):
        clone._encoder_stale = False
    return clone


def by_sampled_items(instance_items, vectors_by_item, device):
    """(rows, override) per group of rows that sampled knowledge for the same items, in first-seen order:
    ``rows`` a LongTensor of row indices on ``device``, ``override`` {item: vector} of those items only."""
    groups = {}
    for row, items in enumerate(instance_items):
        groups.setdefault(tuple(items), []).append(row)
    return [(torch.as_tensor(rows, dtype=torch.long, device=device), {item: vectors_by_item[item] for item in items})
            for items, rows in groups.items()]


def instance_items_from(membership, items):
    """Each row's sampled items, from a membership matrix [B, U] over ``items`` (length U)."""
    return [[items[u] for u in row.nonzero().flatten().tolist()] for row in membership]


def per_instance_log_prob(recommender, interaction, instance_items, vectors_by_item):
    """log p(y_b | x_b, s_b) [B]: row b's target under the recommender with only b's own samples in place."""
    out = torch.empty(len(instance_items), device=interaction[recommender.ITEM_SEQ].device)
    for rows, override in by_sampled_items(instance_items, vectors_by_item, out.device):
        out[rows] = recommender.target_log_prob(interaction[rows], knowledge_override=override).float()
    return out


class KnowledgeEncoder:
    """texts -> sentence vectors [n, d_text] with the config's text encoder, exactly as the knowledge
    matrix is encoded (``encode_texts``: mean pooling, L2-normalised, ``knowledge_encoder_max_length``, 0 for an
    empty text), without the disk cache or the padding row of ``encode_knowledge``. Loads the encoder on first use
    (picklable before)."""

    def __init__(self, config, device=None):
        self.path = seralm_get(config, "encoder_path")
        self.max_length = int(seralm_get(config, "knowledge_encoder_max_length"))
        self.device = device
        self.encoder = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["encoder"] = None
        return state

    def __call__(self, texts):
        if self.encoder is None:
            self.encoder = loader.load_text_encoder(self.path, device=self.device)
        model, tokenizer = self.encoder
        return encode_texts(model, tokenizer, texts, self.max_length)


def item_prompts(dataset, config, tokenizer):
    """The knowledge prompt (chat template applied) of every item, by internal id ("" for padding)."""
    texts = item_source_texts(dataset, config)
    return [""] + knowledge_prompts(texts[1:], tokenizer)


# ---------------------------------------------------------------------------------------- the work
class GeneratorCore:
    """One generator batch from fixed snapshot parameters; shared by the sync job and the Ray actor.

    Args:
        llm: peft model (base LLM + LoRA); tokenizer: its left-padding tokenizer.
        prompts: list indexed by item id of the full prompt string (chat template applied).
        recommender: a SeRALM model (``target_log_prob(interaction, knowledge_override)``) used as the
            snapshot theta_r'; this object is owned by the core (pass a copy).
        frozen_base: plain RecBole model pre-trained without knowledge (eval, no grad).
        encode: callable list[str] -> Tensor [n, d_text] (the text encoder).
        options: dict with history_items, max_new_tokens, temperature, top_p, repetition_penalty,
            gen_batch_size, seed, and grounding (the prefixes of ``knowledge_grounding``, by item id, or None).
    """

    def __init__(self, llm, tokenizer, prompts, recommender, frozen_base, encode, options):
        self.llm, self.tokenizer, self.prompts = llm, tokenizer, prompts
        self.recommender, self.frozen_base, self.encode = recommender, frozen_base, encode
        self.options = dict(options)
        self.recommender.eval()
        self.recommender.requires_grad_(False)
        self.frozen_base.eval()
        self.frozen_base.requires_grad_(False)
        self.snapshot = None  # LoRA parameter values by parameter name
        self.snapshot_step = None
        self.snapshot_digest = None

    def load_snapshot(self, lora, rec_state, step):
        """Install a snapshot: LoRA state (peft state-dict keys) and the recommender's state dict."""
        named = _lora_params(self.llm)
        values = _lora_values_by_param(self.llm, lora)
        missing = set(named) - set(values)
        if missing:
            raise ValueError(f"LoRA snapshot misses {len(missing)} parameters, e.g. {sorted(missing)[0]!r}.")
        self.snapshot = {n: values[n].to(p.device, p.dtype) for n, p in named.items()}
        device = next(self.recommender.parameters()).device
        self.recommender.load_state_dict({k: v.to(device) if torch.is_tensor(v) else v for k, v in rec_state.items()})
        self.snapshot_step = step
        self.snapshot_digest = state_digest(lora)

    @torch.no_grad()
    def produce(self, interaction, seed=None):
        """(s, log p(y|x,s), log p(y|x), per-token log p_orig(s|x)) for one interaction batch; CPU tensors."""
        if self.snapshot is None:
            raise RuntimeError("the generator has no snapshot yet: call refresh() before the first batch.")
        opts = self.options
        rec = self.recommender
        device = next(rec.parameters()).device
        interaction = interaction.to(device)
        instance_items = select_history_items(interaction[rec.ITEM_SEQ], interaction[rec.ITEM_SEQ_LEN],
                                              int(opts["history_items"]))
        unique = sorted({i for items in instance_items for i in items})
        prompts = [self.prompts[i] for i in unique]
        was_training = self.llm.training
        self.llm.eval()
        with swapped_lora(self.llm, self.snapshot):
            gens = generate_with_ids(
                self.llm, self.tokenizer, prompts, max_new_tokens=int(opts["max_new_tokens"]),
                batch_size=int(opts["gen_batch_size"]), repetition_penalty=float(opts["repetition_penalty"]),
                do_sample=True, temperature=float(opts["temperature"]), top_p=float(opts["top_p"]),
                seed=seed, progress=False)
        prompt_ids = [g["prompt_ids"] for g in gens]
        gen_ids = [g["gen_ids"] for g in gens]
        with self.llm.disable_adapter():
            orig = sequence_logprobs(self.llm, prompt_ids, gen_ids, batch_size=int(opts["gen_batch_size"]),
                                     pad_token_id=self.tokenizer.pad_token_id)
        self.llm.train(was_training)
        texts = ground(opts.get("grounding"), unique, [g["text"] for g in gens])  # as the encoder reads them
        if getattr(rec, "train_text_encoder", False):
            vectors = rec.encode_knowledge_texts(texts).float()  # the snapshot's encoder, trained with the model
        else:
            vectors = self.encode(texts).float()
        by_item = {item: vectors[u].to(device) for u, item in enumerate(unique)}
        logp_s = per_instance_log_prob(rec, interaction, instance_items, by_item)
        logp_base = base_log_prob(self.frozen_base, interaction)
        return {
            "items": unique,
            "texts": texts,
            "prompt_ids": prompt_ids,
            "gen_ids": gen_ids,
            "knowledge": vectors.cpu(),
            "membership": membership_matrix(instance_items, unique),
            "logp_rec_s": logp_s.detach().float().cpu(),
            "logp_rec_base": logp_base.detach().float().cpu(),
            "orig_token_logps": [t.detach().float().cpu() for t in orig],
            "snapshot_step": self.snapshot_step,
            "snapshot_digest": self.snapshot_digest,
        }


def _lora_values_by_param(model, lora):
    """Map a peft LoRA state dict (adapter name stripped) onto the model's parameter names."""
    named = _lora_params(model)
    out = {}
    for name in named:
        # parameter: ...q_proj.lora_A.default.weight ; state key: ...q_proj.lora_A.weight
        key = name.replace(".default.", ".")
        if key in lora:
            out[name] = lora[key]
    return out


def generator_options(config):
    """The sampling/selection options of the generator job from the config (see SeRALM YAMLs)."""
    count = int(seralm_get(config, "align_history_items"))
    if count < 1:
        raise ValueError(f"align_history_items must be >= 1, got {count}.")
    return {
        "history_items": count,
        "max_new_tokens": int(seralm_get(config, "align_max_new_tokens")),
        "temperature": float(seralm_get(config, "align_temperature")),
        "top_p": float(seralm_get(config, "align_top_p")),
        "repetition_penalty": float(seralm_get(config, "align_repetition_penalty")),
        "gen_batch_size": int(seralm_get(config, "align_generation_batch_size")),
    }


# ------------------------------------------------------------------------------------------- jobs
class GeneratorJob:
    """Interface: ``refresh(lora_state, rec_state, step)``, ``submit(interaction, seed)``, ``next()``,
    ``close()``; ``maybe_refresh`` sends a snapshot when ``step % refresh_every == 0``."""

    def __init__(self, refresh_every):
        if int(refresh_every) < 1:
            raise ValueError(f"refresh_every must be a positive integer, got {refresh_every!r}.")
        self.refresh_every = int(refresh_every)
        self.refresh_steps = []

    def maybe_refresh(self, step, snapshot_fn):
        """Refresh at steps 0, N, 2N, ...; ``snapshot_fn()`` -> (lora_state, rec_state), built only then."""
        if step % self.refresh_every == 0:
            lora, rec_state = snapshot_fn()
            self.refresh(lora, rec_state, step)
            self.refresh_steps.append(step)
            return True
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class SyncGenerator(GeneratorJob):
    """Same-process generator: ``next()`` computes the oldest submitted batch with the current snapshot.
    Shares the trainer's LLM (the snapshot LoRA values are swapped in for generation) and keeps its own
    copy of the recommender."""

    def __init__(self, llm, tokenizer, prompts, recommender, frozen_base, encode, options, refresh_every):
        super().__init__(refresh_every)
        self.core = GeneratorCore(llm, tokenizer, prompts, recommender_copy(recommender), frozen_base, encode, options)
        self.pending = deque()

    def refresh(self, lora, rec_state, step):
        self.core.load_snapshot(lora, rec_state, step)

    def submit(self, interaction, seed=None):
        self.pending.append((interaction, seed))

    def next(self):
        if not self.pending:
            raise RuntimeError("next() called with no submitted batch.")
        interaction, seed = self.pending.popleft()
        return self.core.produce(interaction, seed)

    def close(self):
        self.pending.clear()


class _GeneratorActor:
    """Body of the Ray actor: builds its own LoRA LLM from the config, holds the recommenders."""

    def __init__(self, config, prompts, recommender, frozen_base, encode, options, num_threads, dtype="auto"):
        torch.set_num_threads(max(1, int(num_threads)))
        # The trainer's dtype: the original LLM's log-probs computed here enter the KL against the trainer's, so
        # a precision gap (fp32 actor vs bf16 trainer) would read as divergence even at identical weights.
        llm, tokenizer = build_lora_llm(config, device="cuda" if torch.cuda.is_available() else "cpu", dtype=dtype)
        device = next(llm.parameters()).device
        recommender.to(device)
        frozen_base.to(device)
        if isinstance(encode, KnowledgeEncoder):
            encode.device = device  # the actor's own device, not the trainer's
        self.core = GeneratorCore(llm, tokenizer, prompts, recommender, frozen_base, encode, options)

    def refresh(self, lora, rec_state, step):
        self.core.load_snapshot(lora, rec_state, step)
        return step

    def produce(self, interaction, seed):
        return self.core.produce(interaction, seed)


class RayGenerator(GeneratorJob):
    """Generator job as a Ray actor. ``ray.init()`` locally unless ``ray_address`` names a cluster;
    snapshots travel as state dicts (LoRA parameters only for the LLM). ``prefetch`` batches are kept
    submitted ahead of the trainer, so generation of batch t+1.. overlaps the trainer's step t; a snapshot
    sent at step t therefore applies to the batches submitted after it (staleness up to
    refresh_every + prefetch steps, the price of never waiting)."""

    def __init__(self, config, prompts, recommender, frozen_base, encode, options, refresh_every,
                 ray_address=None, num_cpus=1, num_gpus=0, prefetch=2, dtype="auto"):
        super().__init__(refresh_every)
        self._ray, self._owns_ray = start_ray(ray_address, num_cpus=max(int(num_cpus) + 1, 2))
        ray = self._ray
        actor_class = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_GeneratorActor)
        # The actor gets its own copies (pickled once); afterwards only state dicts travel.
        self.actor = actor_class.remote(config, list(prompts), recommender_copy(recommender).cpu(),
                                        copy.deepcopy(frozen_base).cpu(), encode, dict(options), num_cpus, dtype)
        self.prefetch = int(prefetch)
        self.futures = deque()

    def refresh(self, lora, rec_state, step):
        rec_state = cpu_state(rec_state, copy_values=False)  # the trainer's snapshot is already a CPU copy
        # Not awaited: the actor runs calls in order, so batches submitted after this use the new snapshot.
        self._last_refresh = self.actor.refresh.remote(lora, rec_state, step)

    def submit(self, interaction, seed=None):
        self.futures.append(self.actor.produce.remote(interaction.to("cpu"), seed))

    def next(self):
        if not self.futures:
            raise RuntimeError("next() called with no submitted batch.")
        return self._ray.get(self.futures.popleft())

    def close(self):
        ray = self._ray
        self.futures.clear()
        if getattr(self, "actor", None) is not None:
            try:
                ray.kill(self.actor)
            except Exception:  # already gone
                pass
            self.actor = None
        self._owns_ray = stop_ray(ray, self._owns_ray)
