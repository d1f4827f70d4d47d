"""How the knowledge SeRALM's alignment samples differs from the knowledge it regenerates.

    python benchmarks/seralm_decoding.py --items 96 > benchmarks/results/<dir>/seralm-decoding.json

Alignment (Eq. 6) samples s ~ p(s|x) at temperature 1 with no repetition penalty (anything else would bias the
estimator); the knowledge the recommender reads is regenerated greedily with repetition penalty 1.2 (a small LLM
loops without it). For the same items and the same LLM (the CPU profile's SmolLM2, all layers, 16 new tokens) this
measures both decodings: distinct texts, texts with a repeated 3-gram, the mean per-token log p(s|x), the cosine
(MiniLM, the SeRALM text encoder) of each text to the item's own text, and how far a sample lies from the greedy
text and from a second sample of the same item.
"""

import argparse
import json
import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole.data import create_dataset  # noqa: E402

from recbole_llm.llm.encode import mean_pool_encode  # noqa: E402
from recbole_llm.llm.generate import generate_with_ids, sequence_logprobs  # noqa: E402
from recbole_llm.llm.loader import load_text_encoder  # noqa: E402
from recbole_llm.run.quick_start import build_config  # noqa: E402
from recbole_llm.seralm.knowledge import item_source_texts, knowledge_prompts, load_knowledge_llm  # noqa: E402


def repeated_trigram(ids):
    grams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
    return len(grams) != len(set(grams))


def summary(name, gens, logprobs, cos_to_item):
    return {"decoding": name, "distinct_texts": len({g["text"] for g in gens}),
            "repeated_3gram_share": sum(repeated_trigram(g["gen_ids"].tolist()) for g in gens) / len(gens),
            "mean_tokens": sum(len(g["gen_ids"]) for g in gens) / len(gens),
            "mean_token_logprob": float(torch.cat(logprobs).mean()),
            "cosine_to_item_text": float(cos_to_item.mean())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="amazon-scientific")
    parser.add_argument("--items", type=int, default=96)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = build_config("SASRecSeRALM", args.dataset, config_dict={"seed": args.seed, "state": "ERROR"},
                          cmd_args=[], profile="cpu")
    dataset = create_dataset(config)
    texts = item_source_texts(dataset, config)
    items = torch.randperm(len(texts) - 1, generator=torch.Generator().manual_seed(args.seed))[:args.items] + 1
    sources = [texts[i] for i in items.tolist()]
    llm, tokenizer = load_knowledge_llm(config)
    prompts = knowledge_prompts(sources, tokenizer)
    new_tokens = int(config["knowledge_max_new_tokens"])
    greedy = generate_with_ids(llm, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=32,
                               repetition_penalty=float(config["knowledge_repetition_penalty"]), progress=False)
    samples = [generate_with_ids(llm, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=32,
                                 repetition_penalty=float(config["align_repetition_penalty"]), do_sample=True,
                                 temperature=float(config["align_temperature"]), seed=args.seed + k, progress=False)
               for k in range(2)]
    encoder, encoder_tokenizer = load_text_encoder(config["encoder_path"])

    def embed(strings):
        return mean_pool_encode(encoder, encoder_tokenizer, strings, progress=False)

    item_vectors = embed(sources)
    vectors = {name: embed([g["text"] for g in gens]) for name, gens in
               (("greedy", greedy), ("sample", samples[0]), ("sample2", samples[1]))}
    rows = []
    for name, gens in (("greedy, repetition penalty 1.2 (regeneration)", greedy),
                       ("sampled, T=1, no penalty (alignment)", samples[0])):
        with torch.no_grad():
            logprobs = sequence_logprobs(llm, [g["prompt_ids"] for g in gens], [g["gen_ids"] for g in gens],
                                         pad_token_id=tokenizer.pad_token_id)
        key = "greedy" if name.startswith("greedy") else "sample"
        rows.append(summary(name, gens, logprobs, (vectors[key] * item_vectors).sum(-1)))
    result = {"dataset": args.dataset, "items": args.items, "max_new_tokens": new_tokens, "decodings": rows,
              "cosine_sample_to_greedy": float((vectors["sample"] * vectors["greedy"]).sum(-1).mean()),
              "cosine_sample_to_second_sample": float((vectors["sample"] * vectors["sample2"]).sum(-1).mean()),
              "examples": [{"item": s, "greedy": g["text"], "sample": x["text"]}
                           for s, g, x in list(zip(sources, greedy, samples[0]))[:5]]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
