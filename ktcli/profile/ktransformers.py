"""KTransformers optimize-rule compatibility: their class and operator names → ktcli's.

Only what decides placement is used (devices, expert operators); everything else is reported as ignored.
"""
from __future__ import annotations

# replace.class (last dotted part) → what ktcli does with the matched module
EXPERT_CLASSES = {"KTransformersExperts": None, "KExpertsCPU": "KExpertsCPU",
                  "KExpertsTorch": "KExpertsTorch", "KExpertsMarlin": "KExpertsMarlin"}
# KTransformers classes whose optimisation ktcli does not port: transformers' module is kept and only
# the devices in kwargs are used.
DEVICE_ONLY_CLASSES = ("KTransformersLinear", "RotaryEmbedding", "YarnRotaryEmbedding", "KQwen2MoeSparseMoeBlock",
                       "KQwen3MoeSparseMoeBlock", "KMistralSparseMoEBlock", "KDeepseekV2MoE", "KDeepseekV3MoE",
                       "KQwen2MoeModel", "KDeepseekV2Model", "KDeepseekV2Attention", "KMoEGate",
                       "KTransformersLinearV2", "KQwen3MoeModel", "KLlamaModel")
NATIVE_CLASSES = ("default", "Experts", "ktcli.Experts")


def short(cls: str) -> str:
    return cls.rsplit(".", 1)[-1]


def is_kt_class(cls: str) -> bool:
    return cls.startswith("ktransformers.") or short(cls) in EXPERT_CLASSES or short(cls) in DEVICE_ONLY_CLASSES


def classify(cls: str) -> str:
    """'experts' (an expert operator swap), 'default' (keep module, set devices) or 'unknown'."""
    s = short(cls)
    if s in EXPERT_CLASSES or s == "Experts":
        return "experts"
    if cls == "default" or s in DEVICE_ONLY_CLASSES or cls.startswith("ktransformers."):
        return "default"
    return "unknown"


def class_op(cls: str) -> str | None:
    """An operator implied by the class itself (class: KExpertsCPU), else None."""
    return EXPERT_CLASSES.get(short(cls))


def known_classes() -> tuple:
    return (*NATIVE_CLASSES, *EXPERT_CLASSES, *DEVICE_ONLY_CLASSES)


def nearest_class(cls: str) -> str | None:
    """The known class name closest to a misspelled one, if any is close."""
    import difflib
    close = difflib.get_close_matches(short(cls), known_classes(), n=1, cutoff=0.75)
    return close[0] if close else None


def misspelled(cls: str, kwargs: dict) -> str | None:
    """A replace.class that ktcli would silently treat as 'keep transformers' module' although the rule means an
    expert swap: an unknown KTransformers class whose rule sets an operator or that is close to an expert class.
    Returns the known name it most likely means."""
    s = short(cls)
    if s in known_classes() or not cls.startswith("ktransformers."):
        return None
    near = nearest_class(cls)
    if "prefill_op" in kwargs or "generate_op" in kwargs or (near in EXPERT_CLASSES):
        return near or "KTransformersExperts"
    return None
