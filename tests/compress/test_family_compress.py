"""The whole default `compress` (load, inspect, pass, export, verify, evaluate) on tiny random-weight Hugging
Face models of many families, each saved as a checkpoint folder from its config: encoders (BERT, DistilBERT,
RoBERTa, ALBERT, ELECTRA), decoders (GPT-2, a Llama with grouped-query attention), vision transformers (ViT,
DeiT, Swin), CNNs (ResNet, ConvNeXt) and hybrid conv+attention models (MobileViT, LeViT).

Each family's folder is built once per session; text models get an offline tokenizer (BERT, GPT-2) or their
inputs as an .npz, images an .npz of pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelpress.compress.pipeline import Pipeline
from modelpress.compress.recipe import load_recipe
from modelpress.data import infer_task, load_data, packaged_sentences
from modelpress.models import load
from modelpress.passes import Context
from modelpress.targets import cpu_session
from tests.graph.models_zoo import hf_model

transformers = pytest.importorskip("transformers")

# family -> the task inferred from the model
FAMILIES = {
    "bert": "embedding",
    "distilbert": "embedding",
    "roberta": "embedding",
    "albert": "embedding",
    "electra": "embedding",
    "gpt2": "language-model",
    "llama": "language-model",
    "vit": "classification",
    "deit": "classification",
    "swin": "classification",
    "resnet": "classification",
    "convnext": "classification",
    "mobilevit": "classification",
    "levit": "classification",
}
TRANSFORMERS = {"bert", "distilbert", "roberta", "albert", "electra", "gpt2", "llama", "vit", "deit", "swin"}

# honest floors for the tiny random models (W8A8 against the float original, 16 evaluation samples): their
# untrained classifiers' logits lie close together, so a few of 16 top-1 labels flip (DeiT: 0.75, others 0.875-1)
FLOORS = {"embedding": ("fidelity_mean", 0.9), "classification": ("agreement", 0.7),
          "language-model": ("top1_agreement", 0.8)}


def _bert_tokenizer(folder: Path):
    """A WordPiece tokenizer over a vocabulary of the packaged sentences' words, written by the test."""
    words = sorted({w.strip(".,;:!?\"'()").lower() for s in packaged_sentences("train") for w in s.split()} - {""})
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words[:400]]))
    return transformers.BertTokenizerFast(vocab_file=str(vocab))


def _bpe_tokenizer(vocab_size: int):
    """A byte-level BPE trained offline on the packaged sentences (with eos, without a pad token)."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"],
                                             show_progress=False)
    tok.train_from_iterator(packaged_sentences("train"), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def _npz(folder: Path, model) -> str:
    """The model's inputs as an .npz (24 samples): token ids with some padding, or pixels."""
    rng = np.random.default_rng(0)
    cfg = model.config
    if hasattr(cfg, "image_size"):
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        arrays = {"pixel_values": rng.standard_normal((24, cfg.num_channels, size, size)).astype(np.float32)}
    else:
        ids = rng.integers(5, cfg.vocab_size, size=(24, 16))
        mask = np.ones_like(ids)
        mask[::3, 12:] = 0
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    path = folder / "inputs.npz"
    np.savez(path, **arrays)
    return f"tensors:{path}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (checkpoint folder, data source), each built on first use."""
    built: dict[str, tuple[Path, str | None]] = {}

    def get(family: str) -> tuple[Path, str | None]:
        if family not in built:
            folder = tmp_path_factory.mktemp(family)
            ckpt = folder / "ckpt"
            model = hf_model(family)
            model.save_pretrained(ckpt)
            if family == "bert":
                _bert_tokenizer(folder).save_pretrained(ckpt)
                built[family] = (ckpt, None)  # the packaged sentences
            elif family == "gpt2":
                _bpe_tokenizer(model.config.vocab_size // 2).save_pretrained(ckpt)
                text = folder / "text.txt"
                text.write_text("\n".join(packaged_sentences("evaluation")[:24]))
                built[family] = (ckpt, f"text:{text}")
            else:
                built[family] = (ckpt, _npz(folder, model))
        return built[family]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_compress(family, checkpoints, tmp_path):
    ckpt, data = checkpoints(family)
    graph = load(str(ckpt))  # load
    summary = graph.summary()  # inspect
    assert summary["parameters"] == graph.num_parameters() > 0
    if family in TRANSFORMERS:
        blocks = summary["blocks"]
        assert blocks and all(b.get("heads") and b.get("mlp") for b in blocks), blocks
    task = infer_task(graph.input_spec, graph.module)
    assert task.name == FAMILIES[family]
    ctx = Context(workdir=tmp_path / "work", task=task, seed=0,
                  data=load_data(data, graph.input_spec, graph.tokenizer, n_calibration=8, n_evaluation=16))
    result = Pipeline(load_recipe("default")).run(graph, ctx, measure=False)  # pass, export, verify, evaluate
    report = result.report
    verification = report["export"]["compressed"]["verification"]
    assert verification.get("ok", True), verification
    key, floor = FLOORS[task.name]
    quality = report["quality"]
    assert quality["before"][key] > 0.99, quality  # the float export matches the original
    assert quality["after"][key] > floor, quality
    session = cpu_session(str(result.onnx_path))  # the output runs in ONNX Runtime
    batch = ctx.evaluation.numpy_batches()[0]
    names = {i.name for i in session.get_inputs()}
    outputs = session.run(None, {k: v for k, v in batch.items() if k in names})
    assert all(np.isfinite(o).all() for o in outputs)
