"""The LLM with LoRA adapters (SeRALM's alignment, paper 4.4): building it, and moving the adapter's state.

Used by the trainer, its generator job and the LLM workers, which each build the same LLM from the config and
exchange only the LoRA parameters."""

import hashlib

import torch

from recbole_llm.core.config import config_get
from recbole_llm.core.keys import seralm_get
from recbole_llm.llm import loader  # called as loader.load_causal_lm, so tests that monkeypatch it reach this call


def lora_config_from(config):
    """peft LoraConfig from ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``."""
    from peft import LoraConfig  # heavy: peft imports transformers, ~3 s; only LoRA runs need it

    targets = seralm_get(config, "lora_target_modules")
    if isinstance(targets, str):
        targets = [targets]
    r = int(seralm_get(config, "lora_r"))
    if r <= 0:
        raise ValueError(f"lora_r must be a positive integer, got {r}.")
    return LoraConfig(r=r, lora_alpha=float(seralm_get(config, "lora_alpha")),
                      lora_dropout=float(seralm_get(config, "lora_dropout")),
                      target_modules=list(targets), bias="none", task_type="CAUSAL_LM")


def build_lora_llm(config, device=None, dtype="auto"):
    """The frozen LLM of ``llm_path`` (bundled SmolLM2 when unset) with fresh LoRA adapters (B = 0, so
    it starts identical to the original LLM); only the LoRA parameters are trainable. ``dtype`` of the base
    weights: "auto" (bf16/fp16 on CUDA, fp32 on CPU) or a torch dtype."""
    from peft import get_peft_model  # heavy: peft, ~3 s to import

    llm, tokenizer = loader.load_causal_lm(config_get(config, "llm_path"), device=device, dtype=dtype,
                                           num_layers=config_get(config, "llm_num_layers"),
                                           trust_remote_code=bool(seralm_get(config, "llm_trust_remote_code")))
    seed = int(config["seed"])  # RecBole sets it for every run (overall.yaml)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A init is random: same seed, same adapter in trainer and actor
        try:
            model = get_peft_model(llm, lora_config_from(config))
        except ValueError as err:
            raise ValueError(f"lora_target_modules={config_get(config, 'lora_target_modules')!r} does not fit the LLM "
                             f"({err}); expected names of its attention projections, e.g. [q_proj, v_proj].") from None
    # LoRA weights stay fp32 even when the base LLM is half precision (stable small updates).
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model, tokenizer


def lora_state(model):
    """The LoRA parameters only, as CPU tensor copies (what a snapshot sends)."""
    from peft import get_peft_model_state_dict  # heavy: peft, ~3 s to import

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def load_lora_state(model, state):
    from peft import set_peft_model_state_dict  # heavy: peft, ~3 s to import

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"LoRA state holds keys the LLM does not have, e.g. {unexpected[0]!r}.")


def state_digest(state):
    """16-hex digest of a state dict's tensors (names + values); the adapter version of the knowledge."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()[:16]
