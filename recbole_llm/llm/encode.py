"""Hidden states from the frozen LLM and sentence vectors from the text encoder.

Embeddings run the decoder stack only (no LM head over every position). Inputs are left-padded:
position ids come from the attention mask so padding never shifts the positions of real tokens, and
padded keys are masked, so a sequence gives the same states alone or inside a padded batch.
"""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from recbole_llm.llm.device import sdpa_for_backward
from recbole_llm.llm.loader import backbone_of, hidden_size, input_embeddings


def positions_from_mask(attention_mask):
    """Position ids that start at 0 on each row's first real token (padding is clamped to 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states_from_embeds(model, inputs_embeds, attention_mask):
    """Final-layer hidden states [B, T, d] (final norm applied) for inputs_embeds [B, T, d].

    Autograd flows to ``inputs_embeds`` (prefix/suffix tuning); the frozen weights get no gradient.
    """
    attention_mask = attention_mask.to(inputs_embeds.device)
    with sdpa_for_backward(inputs_embeds.device):
        out = backbone_of(model)(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=False,
        )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def last_hidden_from_embeds(model, inputs_embeds, attention_mask):
    """Final-layer hidden state [B, d] at each row's last real token (the last position when left-padded)."""
    hidden = hidden_states_from_embeds(model, inputs_embeds, attention_mask)
    mask = attention_mask.to(hidden.device).long()
    positions = torch.arange(mask.size(1), device=hidden.device)
    last = (mask * positions).argmax(dim=-1)  # also right for right padding
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


def _length_sorted_batches(tokenizer, texts, batch_size, max_length):
    if not texts:
        return []
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    if max_length is not None:
        lengths = [min(n, max_length) for n in lengths]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _tokenize(tokenizer, texts, max_length, device):
    batch = tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                      return_tensors="pt")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def _check_texts(texts):
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}.")
    return texts


@torch.no_grad()
def encode_texts_last(model, tokenizer, texts, batch_size=16, max_length=None, progress=True):
    """Last-token final hidden state of the LLM for each text: float32 CPU tensor [N, d], input order.

    Texts are batched by similar length (less padding) and the rows put back in input order.
    """
    texts = _check_texts(texts)
    device = next(model.parameters()).device
    out = torch.empty(len(texts), hidden_size(model), dtype=torch.float32)
    embed = input_embeddings(model)
    for index in tqdm(_length_sorted_batches(tokenizer, texts, batch_size, max_length),
                      desc="LLM encode", disable=not progress):
        ids, mask = _tokenize(tokenizer, [texts[i] for i in index], max_length, device)
        out[index] = last_hidden_from_embeds(model, embed(ids), mask).float().cpu()
    return out


@torch.no_grad()
def mean_pool_encode(encoder, tokenizer, texts, batch_size=64, max_length=128, normalize=True, progress=True):
    """Sentence vectors [N, d] (float32, CPU): mean of token states over the attention mask, as
    sentence-transformers does for all-MiniLM-L6-v2; L2-normalised unless normalize=False."""
    texts = _check_texts(texts)
    device = next(encoder.parameters()).device
    out = torch.empty(len(texts), hidden_size(encoder), dtype=torch.float32)
    for index in tqdm(_length_sorted_batches(tokenizer, texts, batch_size, max_length),
                      desc="Text encode", disable=not progress):
        ids, mask = _tokenize(tokenizer, [texts[i] for i in index], max_length, device)
        states = encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).float()
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        out[index] = (F.normalize(pooled, dim=-1) if normalize else pooled).cpu()
    return out
