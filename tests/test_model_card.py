"""The model card's loading snippet runs, as written, for every task type: in a fresh process, on a base saved like
a pretrained model, it loads the adapter (a classifier with its number of labels read from the adapter) and gives
the trained model's outputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import transformers
from peft import get_peft_model

from peft_stoc import StocTuningConfig
from peft_stoc.adapter_files import hub

from .test_architectures import ARCHS, micro_batch

# (architecture of tests/test_architectures.py, auto class, task type, extra config, modules_to_save)
CASES = {
    "bert-2-labels": ("bert", "AutoModelForSequenceClassification", "SEQ_CLS", {"num_labels": 2}, None),
    "bert-5-labels": ("bert", "AutoModelForSequenceClassification", "SEQ_CLS", {"num_labels": 5}, None),
    "roberta-5-labels": ("roberta", "AutoModelForSequenceClassification", "SEQ_CLS", {"num_labels": 5}, None),
    "llama-3-labels": ("llama", "AutoModelForSequenceClassification", "SEQ_CLS", {"num_labels": 3}, None),
    "bert-regression": ("bert", "AutoModelForSequenceClassification", "SEQ_CLS", {"num_labels": 1}, None),
    "bert-token-7-labels": ("bert", "AutoModelForTokenClassification", "TOKEN_CLS", {"num_labels": 7}, None),
    "bert-question-answering": ("bert", "AutoModelForQuestionAnswering", "QUESTION_ANS", {}, None),
    "llama-causal": ("llama", "AutoModelForCausalLM", "CAUSAL_LM", {}, None),
    "t5-seq2seq": ("t5", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM", {}, None),
    "vit-4-classes": ("vit", "AutoModelForImageClassification", None, {"num_labels": 4}, ["classifier"]),
}


def _inputs(arch: str, task: str | None, index: int = 0) -> dict[str, torch.Tensor]:
    inputs = micro_batch(arch, index)
    inputs.pop("labels", None)
    return inputs


def _snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card.split(hub.SECTION_START, 1)[1], re.S).group(1)


def test_head_size_is_the_last_head_layer_s_output():
    def entries(**shapes):
        return {f"base_model.model.{k.replace('__', '.')}": {"shape": v} for k, v in shapes.items()}

    assert hub.head_size(entries(classifier__weight=[5, 32], classifier__bias=[5])) == 5
    roberta = entries(classifier__dense__weight=[32, 32], classifier__out_proj__weight=[5, 32])
    assert hub.head_size(roberta) == 5
    square = entries(classifier__dense__weight=[32, 32], classifier__out_proj__weight=[32, 32])
    assert hub.head_size(square) == 32
    assert hub.head_size(entries(**{"x__weight.stoc_delta": [10]})) is None


def test_model_card_snippet_loads_every_task_type(tmp_path):
    script, expected = [], {}
    for case, (arch, auto, task, extra, to_save) in CASES.items():
        config = ARCHS[arch].config.__class__.from_dict(ARCHS[arch].config.to_dict())
        config.problem_type = None  # a training run elsewhere may have set it on the shared config
        for key, value in extra.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        base_dir = tmp_path / case / "base"
        getattr(transformers, auto).from_config(config).save_pretrained(base_dir)
        base = getattr(transformers, auto).from_pretrained(base_dir)
        model = get_peft_model(base, StocTuningConfig(k=30, task_type=task, modules_to_save=to_save))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        out = model(**_inputs(arch, task, index=1))
        loss = (out.start_logits if task == "QUESTION_ANS" else out.logits).pow(2).mean()
        loss.backward()
        optimizer.step()
        adapter_dir = tmp_path / case / "adapter"
        model.save_pretrained(adapter_dir)
        card = (adapter_dir / "README.md").read_text()
        code = _snippet(card)
        assert f'from_pretrained("{base_dir}"' in code and f'"{adapter_dir}"' in code
        if extra.get("num_labels", 2) != 2:
            assert f"num_labels={extra['num_labels']}" in code
        else:
            assert "num_labels" not in code
        model.eval()
        inputs = _inputs(arch, task)
        with torch.no_grad():
            out = model(**inputs)
        key = "start_logits" if task == "QUESTION_ANS" else "logits"
        expected[case] = getattr(out, key)
        torch.save(inputs, tmp_path / case / "inputs.pt")
        script += [
            f"# {case}",
            code,
            "merged.eval()",
            f"inputs = torch.load({str(tmp_path / case / 'inputs.pt')!r})",
            f"with torch.no_grad(): results[{case!r}] = getattr(merged(**inputs), {key!r}).tolist()",
        ]
    program = "\n".join(
        [
            "import json, torch",
            "results = {}",
            *script,
            f"json.dump(results, open({str(tmp_path / 'out.json')!r}, 'w'))",
        ]
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    for case, logits in expected.items():
        assert torch.allclose(torch.tensor(results[case]), logits, atol=1e-5), case


@pytest.mark.parametrize("arch", ["bert"])
def test_model_card_names_the_package_and_how_to_install_it(tmp_path, arch):
    model = get_peft_model(
        transformers.AutoModelForSequenceClassification.from_config(ARCHS[arch].config),
        StocTuningConfig(k=10, task_type="SEQ_CLS"),
    )
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "pip install peft-stoc" in card and "pip install ." in card
