"""Calibration, evaluation and train data, Tasks (how to evaluate, and the loss to train with) and runners
(torch or ONNX, one interface). The digits model zoo lives in ``modelpress.train.zoo`` (it trains)."""

from modelpress.data.digits import digits_split
from modelpress.data.runners import Runner, onnx_runner, torch_runner
from modelpress.data.sources import DataSplit, TaskData, load_data, packaged_sentences
from modelpress.data.tasks import (
    ClassificationTask,
    EmbeddingTask,
    LanguageModelTask,
    ReferenceOutputs,
    Task,
    infer_task,
    similarity_spearman,
    task_for,
)

__all__ = [
    "ClassificationTask",
    "DataSplit",
    "EmbeddingTask",
    "LanguageModelTask",
    "ReferenceOutputs",
    "Runner",
    "Task",
    "TaskData",
    "digits_split",
    "infer_task",
    "load_data",
    "onnx_runner",
    "packaged_sentences",
    "similarity_spearman",
    "task_for",
    "torch_runner",
]
