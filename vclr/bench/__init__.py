"""Benchmarks (`vclr benchmark`, `vclr.benchmark`): models x datasets x tasks, CLIP_benchmark's figures bit for
bit, with intervals.

Owns the dataset registry (`datasets`: CLIP_benchmark's names and webdataset layout, vclr's own datasets, local
folders), the features a model computes of them (`features`, cached), the tasks behind one table (`tasks`: zero-shot
classification, retrieval, linear probe, compositionality, multilingual retrieval; `linear_probe` is CLIP_benchmark's
protocol), how sure each figure is (`stats`: bootstrap intervals, paired comparisons), the matrix runner with its
caches (`matrix`) and its tables, plots and failure sheets (`report`).

May import: vclr.config, vclr.errors, vclr.storage, vclr.rundir, vclr.model, vclr.data, vclr.embed, and the pure
metric and plot functions of vclr.eval (`metrics`, `plots`). Training imports it (train.benchmark scores datasets
at each validation through the same tasks), so it never imports the trainer.
"""
