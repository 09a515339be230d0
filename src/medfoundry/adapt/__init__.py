"""Adaptation: cached embeddings, then adapters with scikit-learn's fit / predict_proba."""
