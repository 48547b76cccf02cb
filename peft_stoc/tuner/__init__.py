"""The PEFT tuner and the adapters' state in the model.

`StocTuningConfig` (config) is what a user writes instead of `LoraConfig`; `StocTuningModel` (model) is the tuner PEFT
attaches. Nothing in the model is replaced: the adapters live in the weight tensors themselves, with the original value
of every changed entry kept once (originals) and each adapter's `SparseDelta` (delta) in `model.stoc_tuning`
(stoc_state). Which base entries may be drawn is decided in candidates. The tuner's parts: which adapter the weights
show and which one trains (adapter_state), merging, the training API (training_api), and loads of base weights or
FSDP2 sharding under the adapters (base_events); base_view and weight_guard make every read of a weight see the model
it should.
"""
