"""Indexes: the index directory and what builds and updates it.

Owns the index directory format (`format`: vectors, FAISS files, manifest, versions), the table of FAISS index
kinds and the choice among them (`kinds`), the SQLite metadata (`metadata`), building, updating, adding and deleting
(`build`) and the traced text tower an index carries for fast text queries (`text_tower`).

May import: vclr.config, vclr.errors, vclr.storage, vclr.rundir, vclr.model, vclr.data and vclr.embed (the latter
three where an index is built, not where one is read). Never vclr.train or Accelerate.
"""
