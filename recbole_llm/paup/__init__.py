"""PAUP, a base sequential recommender that RecBole lacks: the model and PAUP.yaml. SeRALM extends it as it extends
RecBole's models."""
