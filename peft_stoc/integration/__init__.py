"""Where StocTuning meets PEFT and transformers.

registry registers the method with PEFT (peft_type adds its `PeftType` member); peft_model holds the `PeftModel`
classes for the entry points where PEFT offers a tuner no hook; tasks names the auto class of an adapter's base;
callback and trainer_hooks put StocTuning's figures into `Trainer`'s logs without user code.
"""
