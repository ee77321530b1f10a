"""Fitting a training run's schedule to a wall-time budget (train.max_minutes)."""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vclr.train.state import Trainer

logger = logging.getLogger(__name__)

# steps timed before a time budget is fitted (the first step, with its warm-up costs, is left out), and how often it
# is refitted after that, from the time of the last BUDGET_WINDOW steps (later steps may be slower: a loss term
# phased in, a busier machine)
BUDGET_TIMING_STEPS = 10
BUDGET_WINDOW = 50
BUDGET_MARGIN = 0.98  # fit to this share of the time left: the final checkpoint and weights need a moment too


class BudgetClock:
    """Fits the schedule (state.max_steps) to train.max_minutes, never above optim.max_steps: after
    BUDGET_TIMING_STEPS timed steps; then every BUDGET_TIMING_STEPS steps while the window of the last BUDGET_WINDOW
    steps fills, at every step once it is full, and after each validation (whose cost then counts)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.budget_s = trainer.cfg.train.max_minutes * 60
        # (step, elapsed_s) of the latest steps of this process: the oldest is where the timing window starts
        self.history: deque[tuple[int, float]] = deque(maxlen=BUDGET_WINDOW + 1)

    def tick(self, validated: bool) -> None:
        state = self.trainer.state
        if not self.budget_s:
            return
        self.history.append((state.step, state.elapsed_s))
        timed = len(self.history) - 1
        if timed >= BUDGET_TIMING_STEPS and (timed % BUDGET_TIMING_STEPS == 0 or validated):
            (first_step, first_s), (step, elapsed_s) = self.history[0], self.history[-1]
            self.fit((elapsed_s - first_s) / (step - first_step))

    def fit(self, seconds_per_step: float) -> None:
        state, cfg = self.trainer.state, self.trainer.cfg
        affordable = state.step + int(BUDGET_MARGIN * (self.budget_s - state.elapsed_s) / seconds_per_step)
        fitted = max(state.step + 1, min(cfg.optim.max_steps, affordable))
        if fitted != state.max_steps:  # said once at INFO; the later small refits at DEBUG
            log = logger.info if state.max_steps == cfg.optim.max_steps else logger.debug
            log("train.max_minutes=%s at %.3f s/step: schedule fitted to %d steps (optim.max_steps=%d)",
                cfg.train.max_minutes, seconds_per_step, fitted, cfg.optim.max_steps)
            if fitted < cfg.optim.warmup_steps:
                logger.warning("the fitted schedule (%d steps) ends inside optim.warmup_steps=%d: the LR never "
                               "decays; give train.max_minutes more time or lower the warm-up", fitted,
                               cfg.optim.warmup_steps)
        state.max_steps = fitted
