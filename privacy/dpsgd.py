"""Sample-level DP-SGD (Abadi et al., CCS 2016) on a client's trainable parameters, with opacus.

Each local step draws a batch by **Poisson sampling** (every local example independently with
probability ``q = min(1, batch_size / n)``, n the client's training examples), computes
per-example gradients of the trainable parameters (opacus ``GradSampleModule``: the LoRA factors
and the ``modules_to_save`` head; the frozen base gets none), clips each example's gradient to L2
norm ``max_grad_norm`` = C over all trainable tensors together, sums, adds Gaussian noise of
standard deviation ``noise_multiplier * C`` = z * C to every coordinate, divides by the expected
batch size ``q * n`` and takes an optimizer step (opacus ``DPOptimizer`` around AdamW; Adam's
moments are post-processing). One step is one sampled Gaussian mechanism with (z, q); a client's
round of ``steps`` local steps is ``GaussianEvent(z, q, steps)``, and its sample-level spend is
the composition of the events of every round whose update left it (`DPSGD.event`).

What it protects: any **one training example** of a client. Adding or removing one example
changes the distribution of everything the client sends (and everything computed from it: the
server's view, the aggregates, the released adapters) by at most the accounted (epsilon, delta),
against everyone, the server included. It does not protect a client's data as a whole (use a
client-level mechanism on top), nor anything the client reveals outside the training steps.

Randomness: the batch draws and the noise come from a NumPy generator seeded with 128 bits from
`secrets` for every call of `DPSGD.train`; torch's global generator (seeded from the public run
seed for dropout) is never used for them, so neither the noise nor which examples were sampled is
predictable from the configuration.

torch and opacus are imported lazily (``secure-fl --help`` stays fast).
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from privacy.accounting import GaussianEvent
from privacy.errors import PrivacyError

PAPER = "https://arxiv.org/abs/1607.00133"


class DPSGDUnsupported(PrivacyError, ValueError):
    """Opacus cannot compute per-example gradients for some trainable parameters of the model."""

    def __init__(self, message: str, parameters: Sequence[str] = ()) -> None:
        super().__init__(message)
        #: The trainable parameters without per-example gradients.
        self.parameters = tuple(parameters)


def sample_rate(batch_size: int, num_examples: int) -> float:
    """The Poisson sampling rate of a client with ``num_examples`` examples: ``min(1, batch_size / n)``.

    >>> sample_rate(16, 64), sample_rate(16, 8)
    (0.25, 1.0)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"DP-SGD needs at least one training example, got {num_examples!r}")
    return min(1.0, batch_size / num_examples)


def parse_sample_rate(text: str) -> float:
    """A sample rate as a client declares it (a decimal string) checked to lie in (0, 1]."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"sample rate {text[:40]!r} is not a number") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"sample rate {value!r} is not in (0, 1]")
    return value


class DPSGD:
    """DP-SGD settings and the private local training loop.

    Parameters
    ----------
    noise_multiplier:
        z (>= 0): Gaussian noise of std z * max_grad_norm on the sum of clipped per-example gradients; 0 means no guarantee.
    max_grad_norm:
        C (> 0): the L2 bound of each example's gradient over all trainable tensors (the per-example clip).
    """

    name: ClassVar[str] = "dp-sgd"
    paper: ClassVar[str] = PAPER
    guarantee: ClassVar[str] = (
        "sample-level (epsilon, delta)-DP of each client's training examples, against everyone "
        "including the server (DP-SGD on the client)"
    )

    def __init__(self, *, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0) -> None:
        if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)) or not (
            0 <= noise_multiplier < math.inf
        ):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not (
            0 < max_grad_norm < math.inf
        ):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)

    def event(self, rate: float, steps: int) -> GaussianEvent:
        """What ``steps`` local steps at sampling rate ``rate`` cost one client's examples."""
        return GaussianEvent(noise_multiplier=self.noise_multiplier, sample_rate=float(rate), steps=int(steps))

    def describe(self) -> dict[str, Any]:
        """The settings and what they protect, for the ledger, ``run.json`` and the report."""
        return {
            "mode": self.name,
            "guarantee": self.guarantee if self.noise_multiplier > 0 else "none",
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "noise_std_on_sum": self.noise_multiplier * self.max_grad_norm,
            "sampling": "Poisson over each client's training examples, q = min(1, batch_size / examples)",
            "noise_added_by": "each client, on every local step (opacus DPOptimizer)",
            "randomness": "NumPy generator seeded with 128 bits from secrets, per round",
        }

    # ------------------------------------------------------------------ model checks
    def check_model(self, model: Any) -> None:
        """Refuse a model whose trainable parameters opacus cannot give per-example gradients.

        Static checks: opacus's own validation (a trainable layer with buffers), and trainable
        parameters held directly by a ``ParameterDict`` / ``ParameterList`` (peft's LoRA on an
        ``Embedding`` keeps its factors there): such a container is never called in the forward
        pass, so no hook ever computes their per-example gradients. Raises `DPSGDUnsupported`
        naming the parameters.
        """
        import torch
        from opacus import GradSampleModule

        errors = GradSampleModule.validate(module=model, strict=False)
        containers = (torch.nn.ParameterDict, torch.nn.ParameterList)
        held = [
            f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() if isinstance(module, containers)
            for name, p in module.named_parameters(recurse=False) if p.requires_grad
        ]
        if held:
            raise DPSGDUnsupported(
                f"opacus cannot compute per-example gradients of {_shown(held)}: they sit in a "
                "ParameterDict/ParameterList that no layer hook sees (e.g. LoRA on an embedding)", held,
            )
        if errors:
            raise DPSGDUnsupported(f"opacus refuses the model: {'; '.join(str(e) for e in errors)[:500]}")

    def check_per_sample_gradients(self, model: Any, loss_fn: Callable[[Any, Any], Any], batch: Any) -> None:
        """Run one forward/backward on ``batch`` under opacus and refuse parameters left without
        per-example gradients (a layer opacus cannot handle), before any round is trained.

        The model's gradients are cleared afterwards and its hooks removed; its weights are unchanged.
        """
        self.check_model(model)
        params = _trainable(model)
        with _per_sample(model) as wrapped:
            was_training = model.training
            model.train()
            try:
                loss = loss_fn(wrapped, batch)
                loss.backward()
                reached = {id(p) for p in params if p.grad is not None}
                missing = [n for n, p in model.named_parameters()
                           if p.requires_grad and id(p) in reached and getattr(p, "grad_sample", None) is None]
            finally:
                model.train(was_training)
                for p in params:
                    p.grad = None
        if missing:
            raise DPSGDUnsupported(f"opacus computed no per-example gradient for {_shown(missing)}", missing)

    # ------------------------------------------------------------------ training
    def train(
        self,
        model: Any,
        loss_fn: Callable[[Any, Any], Any],
        batch_fn: Callable[[Any], Any],
        num_examples: int,
        *,
        steps: int,
        batch_size: int,
        lr: float,
        weight_decay: float = 0.0,
        on_step: Callable[[Sequence[Any]], None] | None = None,
        canaries: np.ndarray | None = None,
    ) -> dict[str, float]:
        """Run ``steps`` DP-SGD steps on ``model``'s trainable parameters; return local diagnostics.

        ``loss_fn(model, batch)`` is the **mean** loss of a batch and ``batch_fn(index)`` builds the
        batch of the examples at ``index`` (a 1-d int64 CPU tensor) on the model's device. A step
        whose Poisson draw is empty still adds the noise (and counts). ``on_step(params)`` is called
        after every step's noised gradient is in ``p.grad``, before the optimizer applies it
        (diagnostics, tests). The returned
        ``sampled_examples`` and ``empty_steps`` are functions of the private data: keep them local.

        ``canaries`` (only the sample-level empirical audit, `secure_fl.empirical_audit.CanaryExamples`):
        a ``(k, D)`` array, one row per canary example of this client, D the trainable parameters
        flattened in ``model.parameters()`` order. Each row is that example's per-example gradient:
        it is clipped to ``max_grad_norm`` like every other example's, and every step includes each
        canary independently with the same Poisson rate ``q`` as the real examples (from the same
        secret generator), adding it to the sum of clipped gradients before the noise. ``q`` and the
        normalising ``q * num_examples`` stay those of the real examples: a canary is one more
        example of a neighbouring data set, covered by the same (z, q, steps) accounting.
        """
        import torch

        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        rate = sample_rate(batch_size, num_examples)
        rng = np.random.default_rng(secrets.randbits(128))
        params = _trainable(model)
        if not params:
            raise DPSGDUnsupported("the model has no trainable parameters")
        optimizer = _secure_dp_optimizer()(
            torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=rate * num_examples,  # opacus divides the noised sum by this
            loss_reduction="mean",
            rng=rng,
        )
        if on_step is not None:
            optimizer.attach_step_hook(lambda _: on_step(params))
        extra = _canary_rows(canaries, params, self.max_grad_norm)
        sampled = empty = 0
        with _per_sample(model) as wrapped:
            model.train()
            try:
                for _ in range(steps):
                    index = torch.from_numpy(np.flatnonzero(rng.random(num_examples) < rate).astype(np.int64))
                    optimizer.zero_grad(set_to_none=True)
                    if len(index):
                        loss_fn(wrapped, batch_fn(index)).backward()
                    else:  # nobody sampled: the step is pure noise, and still counts
                        empty += 1
                        for p in params:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    missing = [p for p in params if getattr(p, "grad_sample", None) is None]
                    if missing:
                        raise DPSGDUnsupported("opacus computed no per-example gradient for some trainable parameters")
                    if extra is not None:  # the sampled canaries' clipped gradients join the sum before the noise
                        chosen = torch.from_numpy((rng.random(extra.shape[0]) < rate).astype(np.float64))
                        optimizer.canary_sum = chosen.to(extra.dtype) @ extra
                    optimizer.step()
                    sampled += len(index)
            finally:
                optimizer.zero_grad(set_to_none=True)
                model.eval()
        return {"sampled_examples": float(sampled), "empty_steps": float(empty), "sample_rate": rate}


def _canary_rows(canaries: np.ndarray | None, params: Sequence[Any], clip: float) -> Any:
    """The canary gradients as a float64 torch matrix, each row clipped to ``clip`` (``None`` without canaries)."""
    if canaries is None:
        return None
    import torch

    rows = np.asarray(canaries, dtype=np.float64)
    size = sum(int(p.numel()) for p in params)
    if rows.ndim != 2 or rows.shape[1] != size or not np.isfinite(rows).all():
        raise ValueError(f"canaries must be a finite (k, {size}) array (one row per canary), got shape {rows.shape}")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows = rows * np.minimum(1.0, clip / np.maximum(norms, 1e-300))  # the per-example clip, as for real examples
    return torch.from_numpy(rows)


def _trainable(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]


def _shown(names: Sequence[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class _per_sample:
    """Context manager: ``model`` wrapped in opacus's ``GradSampleModule`` (mean loss), hooks removed on exit."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.wrapped: Any = None

    def __enter__(self) -> Any:
        from opacus import GradSampleModule

        # opacus's hooks on a LoRA layer whose input needs no gradient: harmless, and said on every backward
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        try:
            self.wrapped = GradSampleModule(self.model, batch_first=True, loss_reduction="mean", strict=True)
        except NotImplementedError as exc:
            self._warnings.__exit__(None, None, None)
            raise DPSGDUnsupported(f"opacus refuses the model: {str(exc)[:500]}") from None
        return self.wrapped

    def __exit__(self, *exc: object) -> None:
        self.wrapped._close()  # removes the hooks and every grad_sample: the model is plain again
        self._warnings.__exit__(None, None, None)


_OPTIMIZER: list[type] = []


def _secure_dp_optimizer() -> type:
    """opacus's ``DPOptimizer`` with the noise drawn from a secret-seeded NumPy generator (built once)."""
    if _OPTIMIZER:
        return _OPTIMIZER[0]
    import torch
    from opacus.optimizers import DPOptimizer

    class SecretNoiseDPOptimizer(DPOptimizer):  # type: ignore[misc]
        """``DPOptimizer`` whose Gaussian noise comes from ``rng`` (one vectorised draw per step, on the CPU,
        then moved to each parameter's device)."""

        def __init__(self, optimizer: Any, *, rng: np.random.Generator, **kwargs: Any) -> None:
            super().__init__(optimizer, **kwargs)
            self.rng = rng
            #: The sampled canaries' summed gradients (flat, `DPSGD.train`'s audit), added before the noise once.
            self.canary_sum: Any = None

        def add_noise(self) -> None:
            sums = [p.summed_grad for p in self.params]
            if self.canary_sum is not None:
                pieces = torch.split(self.canary_sum, [int(s.numel()) for s in sums])
                sums = [s + piece.to(device=s.device, dtype=s.dtype).view_as(s) for s, piece in zip(sums, pieces)]
                self.canary_sum = None
            std = self.noise_multiplier * self.max_grad_norm
            total = sum(int(s.numel()) for s in sums)
            noise = torch.from_numpy(self.rng.standard_normal(total) * std) if std > 0 else torch.zeros(total)
            pieces = torch.split(noise, [int(s.numel()) for s in sums])
            for p, s, piece in zip(self.params, sums, pieces):
                p.grad = (s + piece.to(device=s.device, dtype=s.dtype).view_as(s)).view_as(p)

    _OPTIMIZER.append(SecretNoiseDPOptimizer)
    return SecretNoiseDPOptimizer
