"""The training step: statistics in the forward, gradients in the backward, and the optimizer step confined.

tracking gathers μ during the forwards (token_masks, token_scopes, row_gathers, untraced_uses; opaque_hooks under
torch.compile); gradient_hooks follow the backward (step_progress), where the lean strategy consumes each gradient as
it completes (gradient_stream, consumed_grad). optimizer_hooks runs the step (step: `StocTuningStep`) of the engine of
the adapter being trained (engine): draw, confine, update, through the strategy of its memory mode (dense; lean, with
sparse_optim), after the checks of the optimizer (optimizer_checks); the audit checks that nothing else moved. With
`mask_interval > 1`, steps that reuse their mask compute only the masked entries' gradients (sparse_backward).
"""
