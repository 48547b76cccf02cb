"""The training step: statistics in the forward, gradients in the backward, and the optimizer step confined.

tracking gathers μ during the forwards (token_scopes, row_gathers, opaque_hooks under torch.compile); optimizer_hooks
hands every optimizer step to the step engine of the adapter being trained (engine), which draws the mask, confines
the update (update in dense mode, sparse_optim in memory-lean mode, where gradients are consumed as the backward
produces them: lean, consumed_grad) and lets the audit check that nothing else moved. With `mask_interval > 1`, steps
that reuse their mask compute only the masked entries' gradients (sparse_backward).
"""
