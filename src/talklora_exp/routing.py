"""Routing-balance statistics per adapted layer, over non-padding tokens.

Recorded only while `RoutingRecorder.active` (eval, or every N train steps), so they cost one bool check otherwise.
Pure functions (`balance_stats`, `summarize`) are tested on hand-made distributions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

STAT_KEYS = ("load_entropy", "token_entropy", "cv", "max_min_ratio", "gini", "top1_share", "sensitivity")


def balance_stats(load: np.ndarray) -> dict[str, float | None]:
    """Balance of a mean expert-load vector P (sums to 1): normalised entropy H(P)/log E, CV, max/min, Gini."""
    P = np.asarray(load, dtype=np.float64)
    E = P.size
    nz = P[P > 0]
    ent = float(-(nz * np.log(nz)).sum() / math.log(E)) if E > 1 else None
    mean = P.mean()
    cv = float(P.std() / mean) if mean > 0 else None
    mmr = float(P.max() / P.min()) if P.min() > 0 else None  # None = some expert never used (ratio infinite)
    gini = float(np.abs(P[:, None] - P[None, :]).sum() / (2 * E * E * mean)) if mean > 0 else None
    return {"load_entropy": ent, "cv": cv, "max_min_ratio": mmr, "gini": gini}


def summarize(sum_p: np.ndarray, top1: np.ndarray, ent_sum: float, sens_sum: float, n: int) -> dict[str, Any]:
    """Per-layer statistics from accumulated sums over n tokens."""
    E = len(sum_p)
    P = np.asarray(sum_p, dtype=np.float64) / max(n, 1)
    out: dict[str, Any] = {"tokens": int(n), "load": P.tolist()}
    out.update(balance_stats(P))
    out["token_entropy"] = float(ent_sum / max(n, 1) / math.log(E)) if E > 1 else None
    out["top1_share"] = float(np.max(top1) / max(n, 1))
    out["sensitivity"] = float(sens_sum / max(n, 1))
    return out


def aggregate(per_layer: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Mean of each statistic over layers (layers where it is undefined are left out)."""
    agg: dict[str, float | None] = {}
    for k in STAT_KEYS:
        vals = [v[k] for v in per_layer.values() if v.get(k) is not None]
        agg[k] = float(np.mean(vals)) if vals else None
    return agg


class RoutingRecorder:
    """Accumulates routing sums per layer while active; `stop()` returns per-layer and aggregated statistics.

    `layers` maps a name to a routed layer (an experts module, `tuners.mixture.Routed`: `probs(x)`, and `taps` it
    calls with (layer, x, g) in its forward, never on a checkpoint recompute). The recorder taps every layer from
    `start()` to `stop()` and no longer."""

    def __init__(self, layers: dict[str, Any], sensitivity_eps: float = 1e-2, seed: int = 0):
        self.layers = layers
        self.eps = sensitivity_eps
        self.seed = seed
        self.active = False
        self.mask: torch.Tensor | None = None
        self.acc: dict[str, dict[str, Any]] = {}
        self._gen: torch.Generator | None = None
        self.taps = {name: self._tap(name) for name in layers}

    def _tap(self, name: str) -> Any:
        def tap(layer: Any, x: torch.Tensor, g: torch.Tensor) -> None:
            self.observe(name, layer, x, g)

        return tap

    def remove(self) -> None:
        """Detach from the layers (a layer with no tap does no routing work at all: a compiled forward stays one
        graph)."""
        for name, lyr in self.layers.items():
            if self.taps[name] in lyr.taps:
                lyr.taps.remove(self.taps[name])

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.mask = mask

    def token_mask(self, shape: torch.Size) -> torch.Tensor | None:
        """The attention mask when it lines up with this activation's token axes (not during cached decoding)."""
        if self.mask is not None and tuple(self.mask.shape) == tuple(shape):
            return self.mask.bool()
        return None

    def mismatched(self, shape: torch.Size) -> bool:
        """A mask is set but does not fit (e.g. one-token decode steps after a prompt): skip, don't guess."""
        return self.mask is not None and tuple(self.mask.shape) != tuple(shape)

    def beams(self, shape: torch.Size) -> int:
        """How many copies of each masked row this activation holds: beam search runs the prompt once per beam,
        each batch row repeated in place (`repeat_interleave`), so the copies are identical and count once."""
        if self.mask is None or len(shape) != 2 or self.mask.dim() != 2 or shape[1] != self.mask.shape[1]:
            return 1
        b, n = self.mask.shape[0], shape[0]
        return n // b if n > b and n % b == 0 else 1

    def start(self) -> None:
        """Tap every layer until `stop()`."""
        self.active, self.acc, self._gen = True, {}, None
        for name, lyr in self.layers.items():
            if self.taps[name] not in lyr.taps:
                lyr.taps.append(self.taps[name])

    def stop(self) -> dict[str, Any]:
        self.active = False
        self.remove()
        per_layer = {
            name: summarize(
                a["sum_p"].cpu().numpy(), a["top1"].cpu().numpy(), a["ent"].item(), a["sens"].item(), a["n"]
            )
            for name, a in self.acc.items()
        }
        self.acc = {}
        return {"layers": per_layer, "aggregate": aggregate(per_layer)}

    @torch.no_grad()
    def observe(self, name: str, layer: Any, x: torch.Tensor, g: torch.Tensor) -> None:
        E = g.shape[-1]
        n_beams = self.beams(g.shape[:-1])
        if n_beams > 1:  # the prompt's forward under beam search: the first copy of each row
            x, g = x[::n_beams], g[::n_beams]
        if self.mismatched(g.shape[:-1]):
            return
        m = self.token_mask(g.shape[:-1])
        xf, gf = x.reshape(-1, x.shape[-1]), g.reshape(-1, E).float()
        if m is not None:
            sel = m.reshape(-1)
            xf, gf = xf[sel], gf[sel]
        if gf.shape[0] == 0:
            return
        a = self.acc.get(name)
        if a is None:
            z = torch.zeros(E, device=g.device, dtype=torch.float64)
            a = self.acc[name] = {
                "sum_p": z,
                "top1": z.clone(),
                "ent": z.new_zeros(()),
                "sens": z.new_zeros(()),
                "n": 0,
            }
        a["sum_p"] += gf.sum(0).double()
        a["top1"] += torch.bincount(gf.argmax(-1), minlength=E).double()
        a["ent"] += -(gf * gf.clamp_min(1e-12).log()).sum().double()
        a["n"] += gf.shape[0]
        # Sensitivity: (|dg|/|g|) / (|dx|/|x|) with |dx| = eps |x| per token, on dropout-free routing.
        if self._gen is None:
            self._gen = torch.Generator(device=xf.device).manual_seed(self.seed)
        noise = torch.randn(xf.shape, generator=self._gen, device=xf.device, dtype=xf.dtype)
        dx = noise / noise.norm(dim=-1, keepdim=True) * self.eps * xf.norm(dim=-1, keepdim=True)
        g0 = layer.probs(xf).float()
        g1 = layer.probs(xf + dx).float()
        a["sens"] += (((g1 - g0).norm(dim=-1) / g0.norm(dim=-1)) / self.eps).sum().double()
