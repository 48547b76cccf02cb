"""The adapter on disk: `adapter_model.safetensors` with sparse deltas, and its folder.

adapter_file reads and writes the file (its keys and header entries in file_layout, the checks of what it holds in
file_checks, its header read within limits in safetensors_header, the base it was made for in fingerprint); validation
is the one validation of a load; adapter_io maps the file to and from PEFT's state dicts; transactions attaches an
adapter so that a failure leaves the model as it was; atomic_folder swaps a saved folder in whole; hub writes the model
card and uploads.
"""
