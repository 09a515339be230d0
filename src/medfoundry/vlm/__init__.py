"""Vision-language: CLIP-style image-text pre-training, zero-shot classification and retrieval.

One module per job: ``pairs`` (image-text pairs from CSV, JSON or VQA-RAD), ``text`` (tokenizer and text tower),
``clip`` (the two towers, projections, temperature, loss and the model folder), ``train`` (the training loop),
``zeroshot`` (prompt ensembles) and ``retrieval`` (Recall@K). See docs/vision-language.md.
"""
