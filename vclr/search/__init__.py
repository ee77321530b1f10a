"""Search: queries against an index.

Owns the searcher (`searcher`: hits, weak-match marks, the text query cache), the query encoders, one per backend,
and the one way a query image is read (`encoders`), queries through an ONNX export without torch (`onnx`), query
bounds and service limits (`limits`), the weak-match calibration (`calibration`) and near-duplicates: groups,
their calibrated threshold, one hit per set in results (`duplicates`).

May import: vclr.config, vclr.errors, vclr.storage, vclr.index, vclr.export.format, vclr.data (image decoding, the
cache folder), and (lazily, in the PyTorch encoders) vclr.model and vclr.embed. Never vclr.train or Accelerate;
`onnx` never imports torch.
"""
