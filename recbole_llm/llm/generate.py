"""Batched text generation with the (frozen or LoRA-adapted) LLM, and log-probs of generated tokens.

Prompts are sorted by length and left-padded so each batch wastes little compute; results come back
in input order. Greedy by default; sampling is reproducible with ``seed``. ``repetition_penalty``
defaults to 1.2 because small models such as SmolLM2-135M loop without it.
"""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from recbole_llm.llm.encode import positions_from_mask
from recbole_llm.llm.device import sdpa_for_backward


def build_chat_prompts(tokenizer, user_messages, system=None):
    """One prompt string per user message: the tokenizer's chat template with a generation prompt
    when it has one, else the plain text (system text, if any, on the line before)."""
    prompts = []
    for message in user_messages:
        if getattr(tokenizer, "chat_template", None):
            chat = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
            prompts.append(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
        else:
            prompts.append(f"{system}\n{message}" if system else message)
    return prompts


def _device(model):
    return next(model.parameters()).device


def stop_ids(model, tokenizer):
    """Sorted token ids that end a generated text: the generation config's EOS ids and the tokenizer's."""
    ids = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return sorted(ids)


def _add_special_tokens(tokenizer, prompts):
    """False when the prompts already start with the BOS text (chat templates write it): no double BOS."""
    bos = tokenizer.bos_token
    return not (bos and all(p.startswith(bos) for p in prompts))


def _trim(gen, stops):
    """Cut a generated row after its first stop token (kept: the model chose to stop)."""
    for position, token in enumerate(gen.tolist()):
        if token in stops:
            return gen[: position + 1]
    return gen


def generate_with_ids(model, tokenizer, prompts, max_new_tokens=64, batch_size=32, repetition_penalty=1.2,
                      do_sample=False, temperature=1.0, top_p=1.0, seed=None, progress=True):
    """Generate for each prompt; returns, in input order, dicts with
    ``text`` (new text only, special tokens skipped, stripped), ``prompt_ids`` (LongTensor, unpadded, CPU) and
    ``gen_ids`` (LongTensor of new tokens, CPU, cut after the first eos which is kept)."""
    prompts = list(prompts)
    if any(not isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings.")
    if tokenizer.padding_side != "left":
        raise ValueError("generation needs a left-padding tokenizer (tokenizer.padding_side='left'); "
                         "load it with load_causal_lm.")
    if not prompts:
        return []
    device = _device(model)
    stops = stop_ids(model, tokenizer)
    options = dict(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty, do_sample=do_sample,
                   pad_token_id=tokenizer.pad_token_id, eos_token_id=stops or None)
    if do_sample:
        # top_k=0: transformers fills an unset top_k with 50, which would truncate p(s|x); the alignment scores
        # samples under the full softmax, so they must come from it (only temperature/top_p shape it, on request).
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # neutralise sampling fields that a model's generation_config may set, to keep greedy silent
        options.update(temperature=None, top_p=None, top_k=None)
    special = _add_special_tokens(tokenizer, prompts)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=special)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    results = [None] * len(prompts)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        for start in tqdm(range(0, len(order), batch_size), desc="Generate", disable=not progress):
            index = order[start:start + batch_size]
            batch = tokenizer([prompts[i] for i in index], padding=True, add_special_tokens=special,
                              return_tensors="pt").to(device)
            out = model.generate(**batch, **options)
            width = batch["input_ids"].size(1)
            for row, i in enumerate(index):
                prompt_ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].cpu()
                gen_ids = _trim(out[row, width:].cpu(), set(stops))
                text = tokenizer.decode(gen_ids, skip_special_tokens=True).strip()
                results[i] = {"text": text, "prompt_ids": prompt_ids, "gen_ids": gen_ids}
    return results


def generate_batched(model, tokenizer, prompts, max_new_tokens=64, batch_size=32, repetition_penalty=1.2,
                     do_sample=False, temperature=1.0, top_p=1.0, seed=None, progress=True):
    """The newly generated text for each prompt (stripped), in input order."""
    return [r["text"] for r in generate_with_ids(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        repetition_penalty=repetition_penalty, do_sample=do_sample, temperature=temperature, top_p=top_p,
        seed=seed, progress=progress)]


def sequence_logprobs(model, prompt_ids_list, gen_ids_list, batch_size=8, pad_token_id=0):
    """Per-token log p(gen_t | prompt, gen_<t) for each item: a list of float32 tensors [len(gen_ids)].

    Differentiable when grad is enabled and the model has trainable parameters (LoRA): the alignment
    loss backpropagates through it. Each prompt+gen is left-padded so all rows end at the last
    position; only the logits of the last max(len(gen))+1 positions are computed.
    """
    if len(prompt_ids_list) != len(gen_ids_list):
        raise ValueError(f"got {len(prompt_ids_list)} prompts but {len(gen_ids_list)} generations.")
    device = _device(model)
    trainable = any(p.requires_grad for p in model.parameters())
    results = []
    with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
        for start in range(0, len(gen_ids_list), batch_size):
            prompts = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompt_ids_list[start:start + batch_size]]
            gens = [torch.as_tensor(g, dtype=torch.long).flatten() for g in gen_ids_list[start:start + batch_size]]
            if any(len(p) == 0 for p in prompts):
                raise ValueError("every prompt needs at least one token to condition the first generated token.")
            seqs = [torch.cat([p, g]) for p, g in zip(prompts, gens)]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, seq in enumerate(seqs):
                ids[row, width - len(seq):] = seq
                mask[row, width - len(seq):] = 1
            ids, mask = ids.to(device), mask.to(device)
            keep = max(len(g) for g in gens) + 1
            with sdpa_for_backward(device, even_without_grad=True):  # policy and reference: same kernels
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                               use_cache=False, logits_to_keep=keep).logits
            for row, gen in enumerate(gens):
                n = len(gen)
                # kept position k holds the logits at sequence position width-keep+k; token at position p
                # is predicted at p-1, so the last n tokens are predicted at k = keep-1-n .. keep-2.
                step = logits[row, keep - 1 - n: keep - 1].float()
                results.append(F.log_softmax(step, dim=-1).gather(-1, gen.to(device).unsqueeze(-1)).squeeze(-1))
    return results
