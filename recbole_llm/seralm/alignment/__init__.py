"""SeRALM's alignment of the LLM to the recommender (Algorithm 1): the trainer, the feedback loss with its KL penalty,
and resume."""
