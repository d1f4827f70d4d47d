"""SeRALM: LLM-written item knowledge joined to a base recommender (the model mixin and its 4 variants), the knowledge
pipeline, the asynchronous sampler, alignment, and the YAMLs (SeRALM.yaml shared, one thin YAML per variant)."""
