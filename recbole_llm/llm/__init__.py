"""LLM layer: load the frozen decoder LLM / text encoder offline, encode texts, generate text."""

from recbole_llm.llm.loader import (
    bundled_encoder_dir,
    bundled_llm_gguf,
    cache_dir,
    default_dtype,
    hidden_size,
    input_embeddings,
    load_causal_lm,
    load_text_encoder,
    resolve_device,
)
from recbole_llm.llm.encode import (
    backbone,
    encode_texts_last,
    hidden_states_from_embeds,
    last_hidden_from_embeds,
    mean_pool_encode,
)
from recbole_llm.llm.generate import build_chat_prompts, generate_batched, generate_with_ids, sequence_logprobs
