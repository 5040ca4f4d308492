"""Observers: collect statistics of a tensor over calibration batches and choose a clipping range.

``MinMaxObserver`` (exact running extremes), ``PercentileObserver`` (quantiles of a bounded sample) and
``MSEObserver`` (searches clipping ratios of the min/max range for the smallest quantization error on the
sample). All work per tensor (``axis=None``) or per channel, and end in ``observer.apply(quantizer)``,
which sets the quantizer's scale and zero point.
"""

from __future__ import annotations

import torch

from modelpress.quantize.quantizers import UniformQuantizer


def _rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """[rows, channels] view for per-channel statistics, or [n, 1] for per-tensor ones."""
    x = x.detach().float()
    if axis is None:
        return x.reshape(-1, 1)
    return x.movedim(axis % x.dim(), -1).reshape(-1, x.shape[axis])


class Observer:
    """Base: running min/max plus a bounded random sample of rows (for percentiles and MSE search)."""

    def __init__(self, axis: int | None = None, max_samples: int = 1 << 20, seed: int = 0) -> None:
        self.axis = axis
        self.max_samples = int(max_samples)
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self._sample: list[torch.Tensor] = []
        self._n_sample = 0
        self._gen = torch.Generator().manual_seed(seed)
        self.keeps_sample = True

    def update(self, x: torch.Tensor) -> None:
        rows = _rows(x, self.axis)
        lo, hi = rows.amin(0), rows.amax(0)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        if not self.keeps_sample:
            return
        cols = rows.shape[1]
        budget_rows = max(1, self.max_samples // cols)
        # Keep an even share per batch: subsample each batch to at most budget_rows / 4 rows,
        # and thin the kept sample when it overflows.
        take = min(rows.shape[0], max(1, budget_rows // 4))
        if take < rows.shape[0]:
            idx = torch.randperm(rows.shape[0], generator=self._gen)[:take]
            rows = rows[idx]
        self._sample.append(rows.cpu())
        self._n_sample += rows.shape[0]
        if self._n_sample > 2 * budget_rows:
            allr = torch.cat(self._sample)
            idx = torch.randperm(allr.shape[0], generator=self._gen)[:budget_rows]
            self._sample = [allr[idx]]
            self._n_sample = budget_rows

    def sample(self) -> torch.Tensor:
        if not self._sample:
            raise RuntimeError("observer has seen no data")
        return torch.cat(self._sample)

    def range(self, quantizer: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def apply(self, quantizer: UniformQuantizer) -> None:
        lo, hi = self.range(quantizer)
        if self.axis is None:
            lo, hi = lo.reshape(()), hi.reshape(())
        quantizer.set_range(lo, hi)

    def reset(self) -> None:
        self.min = self.max = None
        self._sample, self._n_sample = [], 0


class MinMaxObserver(Observer):
    def __init__(self, axis: int | None = None, **kwargs) -> None:
        super().__init__(axis, **kwargs)
        self.keeps_sample = False

    def range(self, quantizer: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min is None:
            raise RuntimeError("observer has seen no data")
        return self.min, self.max


class PercentileObserver(Observer):
    """Clipping range from the ``percentile`` (upper) and ``100 - percentile`` (lower) quantiles."""

    def __init__(self, axis: int | None = None, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(axis, **kwargs)
        self.percentile = float(percentile)

    def range(self, quantizer: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sample()
        p = self.percentile / 100.0
        hi = _quantile(s, p)
        lo = _quantile(s, 1.0 - p)
        return lo, hi


def _quantile(s: torch.Tensor, p: float) -> torch.Tensor:
    n = s.shape[0]
    k = min(n, max(1, int(round(p * (n - 1))) + 1))
    return s.kthvalue(k, dim=0).values


class MSEObserver(Observer):
    """Search clipping ratios of the observed [min, max] for the smallest squared quantization error.

    Symmetric quantizers search one ratio of max(|min|, |max|); asymmetric ones search the upper and the
    lower bound in turn (two rounds of coordinate descent). Per-channel observers pick ratios per channel.
    """

    def __init__(
        self, axis: int | None = None, ratios: int = 40, min_ratio: float = 0.3, power: float = 2.0, **kwargs
    ) -> None:
        super().__init__(axis, **kwargs)
        self.candidates = torch.linspace(min_ratio, 1.0, ratios)
        self.power = power

    def _err(
        self, quantizer: UniformQuantizer, s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
    ) -> torch.Tensor:
        probe = UniformQuantizer(quantizer.bits, quantizer.symmetric, axis=-1, narrow=quantizer.narrow)
        probe.set_range(lo, hi)
        err = (probe.fake_quant(s) - s).abs().pow(self.power)
        if self._weights is not None:  # histogram mode: s holds bin centres, weights their counts
            err = err * self._weights
        return err.sum(0)  # per column

    _weights: torch.Tensor | None = None
    HIST_BINS = 16384

    def _histogram(self, s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Per-tensor search on a fine histogram: the error of 2^20 samples at ~60x less cost per candidate.

        With 16384 bins over the observed range, one 8-bit step spans ~64 bins, so evaluating the error at
        bin centres (weighted by counts) tracks the exact sample error closely.
        """
        lo_f, hi_f = float(lo.reshape(-1)[0]), float(hi.reshape(-1)[0])
        if hi_f <= lo_f:
            return s
        counts = torch.histc(s.float().reshape(-1), bins=self.HIST_BINS, min=lo_f, max=hi_f)
        width = (hi_f - lo_f) / self.HIST_BINS
        centres = lo_f + width * (torch.arange(self.HIST_BINS, dtype=torch.float32) + 0.5)
        keep = counts > 0
        self._weights = counts[keep].reshape(-1, 1)
        return centres[keep].reshape(-1, 1)

    @torch.no_grad()
    def range(self, quantizer: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sample()
        lo0, hi0 = self.min.clone(), self.max.clone()
        self._weights = None
        if self.axis is None:  # per-tensor: one column
            lo0, hi0 = lo0.amin().reshape(1), hi0.amax().reshape(1)
            s = s.reshape(-1, 1)
            if s.shape[0] > 4 * self.HIST_BINS:
                s = self._histogram(s, lo0, hi0)
        if quantizer.symmetric:
            amax = torch.maximum(-lo0, hi0)
            best_err, best = None, amax.clone()
            for r in self.candidates:
                err = self._err(quantizer, s, -amax * r, amax * r)
                if best_err is None:
                    best_err = err
                    best = amax * r
                else:
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    best = torch.where(better, amax * r, best)
            self._weights = None
            return -best, best
        lo, hi = lo0.clone(), hi0.clone()
        for _ in range(2):
            for which in ("hi", "lo"):
                best_err = self._err(quantizer, s, lo, hi)
                best = (hi if which == "hi" else lo).clone()
                for r in self.candidates:
                    cand_lo, cand_hi = (lo, hi0 * r) if which == "hi" else (lo0 * r, hi)
                    err = self._err(quantizer, s, cand_lo, cand_hi)
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    best = torch.where(better, cand_hi if which == "hi" else cand_lo, best)
                if which == "hi":
                    hi = best
                else:
                    lo = best
        self._weights = None
        return lo, hi


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(kind: str, axis: int | None = None, **kwargs) -> Observer:
    try:
        cls = OBSERVERS[kind]
    except KeyError:
        raise ValueError(f"unknown observer {kind!r}; choose from {sorted(OBSERVERS)}") from None
    return cls(axis=axis, **kwargs)


@torch.no_grad()
def calibrate_weight(quantizer: UniformQuantizer, weight: torch.Tensor, method: str = "minmax") -> None:
    """Set a weight quantizer's scales from the weight itself (per channel along ``quantizer.axis``)."""
    obs = make_observer(method, axis=quantizer.axis, max_samples=1 << 24)
    obs.update(weight)
    obs.apply(quantizer)
