"""The plugin's models and trainers, by name. Adding a model = one line here + its module + its YAML."""

SEQ = "recbole_llm.model.sequential_recommender"

# model name -> module holding a class of that name
PLUGIN_MODELS = {
    "PAUP": f"{SEQ}.paup",
    "CaserSeRALM": f"{SEQ}.seralm",
    "SASRecSeRALM": f"{SEQ}.seralm",
    "PAUPSeRALM": f"{SEQ}.seralm",
    "LightSANsSeRALM": f"{SEQ}.seralm",
    "Laser": f"{SEQ}.laser",
}

# model name -> (module, trainer class name)
PLUGIN_TRAINERS = {
    "PAUP": ("recbole_llm.trainer.safe", "SafeTrainer"),
    "Laser": ("recbole_llm.trainer.laser_trainer", "LaserTrainer"),
    "CaserSeRALM": ("recbole_llm.trainer.alignment_trainer", "AlignmentTrainer"),
    "SASRecSeRALM": ("recbole_llm.trainer.alignment_trainer", "AlignmentTrainer"),
    "PAUPSeRALM": ("recbole_llm.trainer.alignment_trainer", "AlignmentTrainer"),
    "LightSANsSeRALM": ("recbole_llm.trainer.alignment_trainer", "AlignmentTrainer"),
}
