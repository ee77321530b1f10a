"""Embedding: a model over collections, tables and queries, as float32 unit vectors.

Owns the embedding of image files, PIL images, texts and caption tables through the model's own preprocessing
(`embedding`), and the split of a collection across the processes of a multi-process launch (`processes`).

May import: vclr.config, vclr.errors, vclr.model, vclr.data. Training's validation and the index both use it.
"""
