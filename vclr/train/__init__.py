"""Training: the Accelerate loop and everything only training needs.

Owns the loop (`loop`: setup -> run_loop -> cleanup, checkpoints, time budget), the loss terms behind one interface
(`loss`), GradCache (`gradcache`), the locked towers' cached outputs (`locked_cache`), validation during training
(`validate`), parameter groups and the LR schedule (`optim`) and the step profiler (`profiling`).

May import: vclr.config, vclr.errors, vclr.storage, vclr.rundir, vclr.model, vclr.data, vclr.embed, vclr.bench
(train.benchmark scores datasets at validations), and the pure metric functions of vclr.eval.metrics. Nothing below
training (index, search, serve, eval's reports) imports it.
"""
