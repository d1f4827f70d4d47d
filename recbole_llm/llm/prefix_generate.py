"""Greedy generation that encodes a prompt prefix shared by every prompt only once.

The knowledge prompts of all items share everything up to the item's own text (chat header, system
text, instruction). On CPU the prompt's prefill dominates generation time, so this computes the
prefix's key/value cache once, repeats it over the batch, and prefills only each item's suffix
(its text + the chat template's closing tokens). Suffixes are left-padded *after* the prefix: the
padding is masked and position ids continue from the prefix, so every row sees exactly
``prefix + suffix`` as one unpadded prompt would.
"""

import copy
import inspect

import torch

from recbole_llm.llm.generate import stop_ids


def _cache_name(model):
    """The forward's key/value-cache argument, which is also the output's field: transformers 5 renamed
    ``past_key_values`` to ``cache`` (5.24 warns on the old name; it is to go in 5.40), and setup.cfg allows both."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper takes **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _penalise(scores, seen, penalty):
    """HF-style repetition penalty on tokens already in the prompt or the answer."""
    if penalty == 1.0:
        return scores
    penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalised, scores)


@torch.no_grad()
def prefix_shared_generate(model, tokenizer, prefix, suffixes, max_new_tokens=64, repetition_penalty=1.2,
                           return_ids=False):
    """Greedy continuation of ``prefix + s`` for each ``s`` in ``suffixes``; new text only, stripped
    (``return_ids=True``: the new token ids instead, cut after the first stop token, which is kept).

    Both parts are tokenised without added special tokens (a chat-formatted prefix already holds them).
    """
    if not suffixes:
        return []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix_ids = tokenizer(prefix, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    rows = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in suffixes]
    if prefix_ids.size(1) == 0 or any(len(r) == 0 for r in rows):
        raise ValueError("prefix_shared_generate needs a non-empty prefix and non-empty suffixes.")
    cache_name = _cache_name(model)
    prefix_cache = getattr(model(input_ids=prefix_ids, use_cache=True), cache_name)
    batch, width, start = len(rows), max(len(r) for r in rows), prefix_ids.size(1)
    ids = torch.full((batch, width), pad, dtype=torch.long, device=device)
    suffix_mask = torch.zeros((batch, width), dtype=torch.long, device=device)
    for row, tokens in enumerate(rows):
        ids[row, width - len(tokens):] = torch.tensor(tokens, device=device)
        suffix_mask[row, width - len(tokens):] = 1
    mask = torch.cat([torch.ones((batch, start), dtype=torch.long, device=device), suffix_mask], dim=1)
    positions = start + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(batch)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   **{cache_name: cache}).logits[:, -1]
    vocab = logits.size(-1)
    seen = torch.zeros((batch, vocab), dtype=torch.bool, device=device)
    seen[:, prefix_ids[0].clamp(max=vocab - 1)] = True
    seen.scatter_(1, ids.clamp(max=vocab - 1), suffix_mask.bool())
    stop = torch.tensor(stop_ids(model, tokenizer), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    next_position = positions[:, -1:] + 1
    generated = []
    for _ in range(max_new_tokens):
        token = _penalise(logits.float(), seen, repetition_penalty).argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad), token)
        generated.append(token)
        finished |= torch.isin(token, stop)
        if bool(finished.all()):
            break
        seen[torch.arange(batch, device=device), token] = True
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long, device=device)], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position, use_cache=True,
                       **{cache_name: cache}).logits[:, -1]
        next_position = next_position + 1
    stops = set(stop.tolist())
    kept = []
    for row in torch.stack(generated, dim=1).cpu().tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        kept.append(row[:cut])
    if return_ids:
        return kept
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in kept]
