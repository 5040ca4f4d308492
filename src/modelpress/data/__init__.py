"""Calibration and evaluation data, Tasks (how to evaluate), runners (torch or ONNX, one interface) and a
small model zoo trained on scikit-learn digits."""

from modelpress.data.runners import Runner, onnx_runner, torch_runner
from modelpress.data.sources import DataSplit, TaskData, load_data, packaged_sentences
from modelpress.data.tasks import (
    ClassificationTask,
    EmbeddingTask,
    ReferenceOutputs,
    Task,
    infer_task,
    similarity_spearman,
    task_for,
)
from modelpress.data.zoo import DigitsCNN, ZooModel, digits_cnn, digits_cnn_factory, digits_split, digits_vit

__all__ = [
    "ClassificationTask",
    "DataSplit",
    "DigitsCNN",
    "EmbeddingTask",
    "ReferenceOutputs",
    "Runner",
    "Task",
    "TaskData",
    "ZooModel",
    "digits_cnn",
    "digits_cnn_factory",
    "digits_split",
    "digits_vit",
    "infer_task",
    "load_data",
    "onnx_runner",
    "packaged_sentences",
    "similarity_spearman",
    "task_for",
    "torch_runner",
]
