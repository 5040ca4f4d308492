"""The one training loop (layer L3): distillation from the original model or labels, a step/time budget,
checkpoints to resume from; and the model zoo trained through it (digits models, a Llama on the standard
library's sources)."""

from modelpress.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from modelpress.train.config import DEFAULT_HIDDEN_WEIGHT, TrainConfig
from modelpress.train.distill import hidden_distance, hidden_pairs
from modelpress.train.loop import Augment, TrainResult, train
from modelpress.train.stdlib_lm import StdlibLM, stdlib_llama
from modelpress.train.zoo import DigitsCNN, ZooModel, digits_cnn, digits_cnn_factory, digits_vit, zoo_dir

__all__ = [
    "CHECKPOINT_NAME",
    "DEFAULT_HIDDEN_WEIGHT",
    "Augment",
    "DigitsCNN",
    "StdlibLM",
    "TrainConfig",
    "TrainResult",
    "ZooModel",
    "digits_cnn",
    "digits_cnn_factory",
    "digits_vit",
    "hidden_distance",
    "hidden_pairs",
    "load_checkpoint",
    "stdlib_llama",
    "train",
    "zoo_dir",
]
