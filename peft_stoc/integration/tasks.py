"""Which transformers auto class loads the base model of an adapter: one place for the CLI and the model card."""

from __future__ import annotations

from .. import compat

# PEFT task types with a fixed auto class.
TASK_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}
# Searched, in order, for an architecture when the adapter has no task type (ViT, Whisper, ...).
_BY_ARCHITECTURE = (
    "AutoModelForImageClassification",
    "AutoModelForSpeechSeq2Seq",
    "AutoModelForAudioClassification",
    "AutoModelForMaskedLM",
    "AutoModelForObjectDetection",
    "AutoModelForSemanticSegmentation",
    *TASK_AUTO_CLASSES.values(),
)


def task_name(task_type) -> str | None:
    """A PEFT `TaskType` (or its string) as a plain string."""
    return None if task_type is None else str(getattr(task_type, "value", task_type))


def auto_class_name(task_type, architectures: list[str] | None = None) -> str:
    """The auto class that builds the base: from the task type, else from the base's architecture names."""
    name = TASK_AUTO_CLASSES.get(task_name(task_type) or "")
    if name is not None:
        return name
    for architecture in architectures or []:
        for candidate in _BY_ARCHITECTURE:
            if architecture in _architectures_of(candidate):
                return candidate
    return "AutoModel"


def _architectures_of(auto_class: str) -> set[str]:
    found = set()
    for value in compat.auto_model_names(auto_class).values():
        found.update(value if isinstance(value, (list, tuple)) else [value])
    return found
