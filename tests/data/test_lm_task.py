"""The language-model task: next-token KL, top-1 agreement and perplexity against hand computations,
padding ignored, the distillation loss, task inference, and text for tokenizers without a pad token."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modelpress.data.sources import DataSplit, _text_split
from modelpress.data.tasks import LanguageModelTask, infer_task
from modelpress.graph.inputs import InputSpec

# one sample, 4 positions, vocabulary 3; the last position is padding
IDS = np.array([[0, 2, 1, 0]])
MASK = np.array([[1, 1, 1, 0]])
REF = np.array([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 0.0], [9.0, -9.0, 0.0]]], dtype=np.float32)
CAND = np.array([[[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [-9.0, 9.0, 0.0]]], dtype=np.float32)


def _split(ids=IDS, mask=MASK) -> DataSplit:
    return DataSplit(batches=[{"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask)}])


def _runner(logits):
    return lambda batch: logits


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_metrics_match_a_hand_computation():
    # counted positions: t=0 (predicts id 2) and t=1 (predicts id 1); t=2 predicts padding, t=3 is padding
    kl = agree = nll_c = nll_r = 0.0
    for t, nxt in ((0, 2), (1, 1)):
        p, q = _softmax(REF[0, t]), _softmax(CAND[0, t])
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        agree += float(np.argmax(REF[0, t]) == np.argmax(CAND[0, t]))
        nll_c -= math.log(q[nxt])
        nll_r -= math.log(p[nxt])
    m = LanguageModelTask().evaluate(_runner(CAND), _runner(REF), _split())
    assert m["next_token_kl"] == pytest.approx(kl / 2, rel=1e-5)
    assert m["top1_agreement"] == pytest.approx(agree / 2)  # t=0 agrees (tie broken to id 0), t=1 does not
    assert m["perplexity"] == pytest.approx(math.exp(nll_c / 2), rel=1e-5)
    assert m["reference_perplexity"] == pytest.approx(math.exp(nll_r / 2), rel=1e-5)


def test_identical_model_has_zero_kl_full_agreement_and_equal_perplexity():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 50)).astype(np.float32) * 3
    ids = rng.integers(0, 50, size=(3, 6))
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2, [0] * 2 + [1] * 4])  # right and left padding
    task = LanguageModelTask()
    for kept in (task, LanguageModelTask(cache_bytes=0, chunk=2)):  # reference cached, and rerun
        m = kept.evaluate(_runner(logits), _runner(logits), _split(ids, mask))
        assert m["next_token_kl"] == 0.0
        assert m["top1_agreement"] == 1.0
        assert m["perplexity"] == pytest.approx(m["reference_perplexity"], rel=1e-12)


def test_reference_too_large_to_cache_is_rerun_with_the_same_metrics():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(5, 6, 40)).astype(np.float32) * 2
    cand = ref + rng.normal(size=ref.shape).astype(np.float32)
    ids = rng.integers(0, 40, size=(5, 6))
    split = _split(ids, np.ones_like(ids))
    calls = []

    def reference(batch):
        calls.append(1)
        return ref

    cached = LanguageModelTask().reference_cache(reference, split)
    rerun = LanguageModelTask(cache_bytes=0, chunk=2).reference_cache(reference, split)
    assert isinstance(cached.detail, list) and callable(rerun.detail)
    calls.clear()
    exact = LanguageModelTask().evaluate(_runner(cand), None, split, reference_outputs=cached)
    assert not calls
    again = LanguageModelTask(cache_bytes=0, chunk=2).evaluate(_runner(cand), None, split, reference_outputs=rerun)
    assert calls  # the reference ran again instead of being kept
    assert again == pytest.approx(exact, rel=1e-9)
    assert exact["next_token_kl"] > 0.05 and exact["top1_agreement"] < 1.0


def test_padding_positions_do_not_change_the_metrics():
    cand = CAND.copy()
    cand[0, 2:] = np.array([[50.0, -50.0, 7.0], [3.0, 2.0, 1.0]])  # predicts padding / is padding
    task = LanguageModelTask()
    assert task.evaluate(_runner(cand), _runner(REF), _split()) == task.evaluate(
        _runner(CAND), _runner(REF), _split()
    )


def test_cached_reference_gives_the_same_metrics():
    task = LanguageModelTask()
    cache = task.reference_cache(_runner(REF), _split())
    assert task.evaluate(_runner(CAND), None, _split(), reference_outputs=cache) == task.evaluate(
        _runner(CAND), _runner(REF), _split()
    )


def test_loss_distils_next_token_distributions_and_adds_shifted_cross_entropy():
    task = LanguageModelTask()
    batch = {"input_ids": torch.as_tensor(IDS), "attention_mask": torch.as_tensor(MASK)}
    ref, cand = torch.from_numpy(REF), torch.from_numpy(CAND).requires_grad_()
    assert float(task.loss(ref, ref, batch)) == pytest.approx(0.0, abs=1e-7)
    kl = task.evaluate(_runner(CAND), _runner(REF), _split())["next_token_kl"]
    loss = task.loss(cand, ref, batch)
    assert float(loss.detach()) == pytest.approx(kl, rel=1e-5)
    loss.backward()
    assert cand.grad is not None and float(cand.grad[0, 2:].abs().sum()) == 0.0  # padding gets no gradient
    ce = torch.nn.functional.cross_entropy(torch.from_numpy(CAND[0, :2]), torch.tensor([2, 1]))
    assert float(task.loss(cand.detach(), None, batch)) == pytest.approx(float(ce), rel=1e-5)
    mixed = task.loss(cand.detach(), ref, batch, label_weight=0.25)
    assert float(mixed) == pytest.approx(0.75 * kl + 0.25 * float(ce), rel=1e-5)


def test_infer_task_recognizes_causal_language_models():
    transformers = pytest.importorskip("transformers")
    from modelpress.models.loaders import hf_input_spec

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    assert isinstance(infer_task(hf_input_spec(model), model), LanguageModelTask)

    class Plain(torch.nn.Module):  # no telling class name: decided from the [B, S, V] output
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    spec = InputSpec("text", ["input_ids", "attention_mask"], vocab_size=100)
    assert isinstance(infer_task(spec, Plain()), LanguageModelTask)


class _NoPadTokenizer:
    """Word-level ids, an eos token and no pad token (like GPT-2's and Llama's tokenizers)."""

    pad_token_id = None
    eos_token_id = 7

    def __call__(self, lines, truncation=True, max_length=128, **kwargs):
        if kwargs.get("padding"):
            raise ValueError("Asking to pad but the tokenizer does not have a padding token")
        ids = [[10 + len(w) for w in line.split()][:max_length] for line in lines]
        return {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}


def test_text_for_a_tokenizer_without_pad_token_pads_with_eos_and_masks_it():
    spec = InputSpec("text", ["input_ids", "attention_mask"], vocab_size=100)
    split = _text_split(["a bb ccc", "dddd"], spec, _NoPadTokenizer(), batch_size=4, max_length=16)
    batch = split.batches[0]
    assert batch["input_ids"].tolist() == [[11, 12, 13], [14, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_training_with_the_task_distils_a_perturbed_language_model():
    transformers = pytest.importorskip("transformers")
    import copy

    from modelpress.data import torch_runner
    from modelpress.train import TrainConfig, train

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32, use_cache=False)
    teacher = transformers.GPT2LMHeadModel(cfg).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 100, (32, 12))
    mask = torch.ones_like(ids)
    mask[::2, 9:] = 0
    split = DataSplit(batches=[{"input_ids": ids[i : i + 8], "attention_mask": mask[i : i + 8]} for i in range(0, 32, 8)])
    names = ["input_ids", "attention_mask"]
    task = LanguageModelTask()

    def kl() -> float:
        return task.evaluate(torch_runner(student, names), torch_runner(teacher, names), split)["next_token_kl"]

    before = kl()
    train(student, split, task=task, teacher=teacher, config=TrainConfig(steps=60, lr=3e-3), input_names=names)
    assert kl() < 0.3 * before
