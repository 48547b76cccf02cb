"""The PEFT tuner and the adapters' state in the model.

`StocTuningConfig` (config) is what a user writes instead of `LoraConfig`; `StocTuningModel` (model) is the tuner PEFT
attaches. Nothing in the model is replaced: the adapters live in the weight tensors themselves, with the original value
of every changed entry kept once (originals) and each adapter's `SparseDelta` (delta) in `model.stoc_tuning` (layer).
Which base entries may be drawn is decided in candidates; merging, switching and the training API are the tuner's
parts; base_view and weight_guard make every read of a weight see the model it should.
"""
