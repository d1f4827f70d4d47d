"""LLM layer: the device policy, the bundled models, GGUF conversion, loading the frozen decoder LLM / text encoder
offline, encoding texts, generating text."""

from recbole_llm.llm.bundled import bundled_encoder_dir, bundled_llm_gguf, cache_dir
from recbole_llm.llm.device import default_dtype, resolve_device
from recbole_llm.llm.encode import (
    encode_texts_last,
    hidden_states_from_embeds,
    last_hidden_from_embeds,
    mean_pool_encode,
)
from recbole_llm.llm.generate import build_chat_prompts, generate_batched, generate_with_ids, sequence_logprobs
from recbole_llm.llm.loader import backbone_of, hidden_size, input_embeddings, load_causal_lm, load_text_encoder
