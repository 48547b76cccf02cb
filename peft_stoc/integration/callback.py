"""Trainer logging: StocTuning's per-step figures appear in `Trainer`'s logs without any user code."""

from __future__ import annotations

from transformers import TrainerCallback

from ..tuner.stoc_state import find_tuner

LOG_PREFIX = "stoc/"


class StocTuningCallback(TrainerCallback):
    """Adds `stoc/drawn`, `stoc/changed` and `stoc/density` to every log of a Trainer training a StocTuning model.

    It is registered among transformers' default callbacks when `peft_stoc` is imported, and does nothing for
    other models. While a Trainer trains, it also tells the tuner so, which makes accelerate's word on which
    micro-batch ends an optimizer step the signal for gradient accumulation.

    Example:

        ```py
        >>> trainer = Trainer(model=get_peft_model(base, StocTuningConfig(k="bitfit")), args=args, ...)
        >>> trainer.train()  # logs carry stoc/drawn, stoc/changed, stoc/density, with no callback to pass
        ```
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._set_driven(model, True)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._set_driven(model, False)

    @staticmethod
    def _set_driven(model, driven: bool) -> None:
        """While a Trainer runs, its word on which micro-batch ends a step (accelerate's gradient state) is live."""
        tuner = find_tuner(model)
        if tuner is not None:
            tuner.set_driven_by_trainer(driven)

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        tuner = find_tuner(model)
        if tuner is None or logs is None or "loss" not in logs:
            return
        figures = {LOG_PREFIX + key: value for key, value in tuner.stoc_stats().items() if key != "step"}
        logs.update(figures)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)
