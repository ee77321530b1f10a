"""Data: caption tables, images and the datasets that feed training.

Owns the caption table and the map-style training dataset (`dataset`), labelled images and image groups for
benchmarks (`labelled`), the training batch (`batch`), safe image
decoding of every image format (`images`: PIL, and HEIC and camera RAW through the `photos` extra), the text inside
images (`ocr`: Tesseract), webdataset/parquet shards (`shards`), training data sources behind one protocol
(`sources`), plain photo folders (`folder`), device decoding (`device_decode`), dataset converters (`prepare`), the
demo data (`synthetic`) and vclr's cache directory (`cache`).

May import: vclr.config, vclr.errors, vclr.storage. Never the model, training, index or serving code.
"""
