"""Quantized (bitsandbytes 4-bit and 8-bit) bases.

A quantized weight cannot hold a delta in its storage: its `Overlay` (overlay) holds the changed entries and adds them
to the layer's output, and to the rest of the library it is the weight's storage. bnb_weights says what bitsandbytes
stores and how its values read dequantized.
"""
