"""The adapter on disk: `adapter_model.safetensors` with sparse deltas, and its folder.

adapter_file writes and validates the file (safetensors_header reads its header within limits, fingerprint names the
base it was made for); adapter_io maps it to and from PEFT's state dicts; atomic_folder swaps a saved folder in whole;
hub writes the model card and uploads.
"""
