"""Trainers of the plugin: safe-checkpoint RecBole trainers, resumable runs, and the models' own trainers."""
