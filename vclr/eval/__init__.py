"""Evaluation: metrics, reports, plots and sweeps.

Owns the pure metric functions (`metrics`, numpy; `metrics_torch`, the same ranks on torch), evaluation of a model
on a dataset (`evaluate`: retrieval both ways, zero-shot, kNN, clustering, pair verification), figures (`plots`)
and config grids that train and evaluate each point (`sweep`).

May import everything below it: vclr.config ... vclr.index, vclr.bench, and vclr.train for sweeps only. `metrics`
and `plots` import nothing of vclr but storage, so that training's validation and the benchmark can use them.
"""
