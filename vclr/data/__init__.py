"""Data: caption tables, images and the datasets that feed training.

Owns the caption table and the map-style training dataset (`dataset`), the training batch (`batch`), safe image
decoding with PIL only (`images`), webdataset/parquet shards (`shards`), training data sources behind one protocol
(`sources`), plain photo folders (`folder`), device decoding (`device_decode`), dataset converters (`prepare`), the
demo data (`synthetic`) and vclr's cache directory (`cache`).

May import: vclr.config, vclr.errors, vclr.storage. Never the model, training, index or serving code.
"""
