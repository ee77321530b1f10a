"""Exports of a model for other runtimes.

Owns the ONNX export folder's format (`format`, read by vclr.search.onnx) and its writer (`onnx`: the dynamo
exporter, checked against PyTorch before anything is written).

May import: vclr.config, vclr.errors, vclr.storage, vclr.model, vclr.embed, vclr.index, vclr.search.
"""
