import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# The tests run tiny models, where a second thread only adds synchronisation (on a busy machine it costs several
# times the work itself); PEFT_STOC_TEST_THREADS sets another count.
torch.set_num_threads(int(os.environ.get("PEFT_STOC_TEST_THREADS", "1")))
