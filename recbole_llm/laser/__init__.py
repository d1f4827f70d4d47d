"""Laser (Bi-Tuning of a frozen LLM): the model, M-Former, the frozen ID-based recommender it reads, its two-stage
trainer and Laser.yaml."""
