"""Next-token loss of a model's runs on the same tokens: CE of each, KL of each against the clean run.

Evals (the SAE spliced in, zero ablation) and steering (each intervention) measure the same two
things over batches of held-out text; `NextTokenLoss` is that accumulation, written once.
"""

from __future__ import annotations

from collections.abc import Hashable

from torch import Tensor


def next_token_logprobs(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(log-softmax [B, T-1, V], CE per position [B, T-1]) for next-token prediction."""
    logp = logits[:, :-1].float().log_softmax(-1)
    ce = -logp.gather(-1, tokens[:, 1:, None].to(logp.device)).squeeze(-1)
    return logp, ce


class NextTokenLoss:
    """Summed next-token CE of a clean run and of named runs, and KL(clean || run), over batches.

    Per batch: `clean(logits, tokens)` first, then `run(name, logits, tokens)` for each other run on
    the same tokens (names are any hashable). Means divide by the number of predicted tokens.
    """

    def __init__(self) -> None:
        self.n = 0
        """Predicted tokens so far."""
        self.ce_clean = 0.0
        """Summed CE of the clean run."""
        self.ce: dict[Hashable, float] = {}
        """Summed CE of each other run."""
        self.kl: dict[Hashable, float] = {}
        """Summed KL(clean || run) of each run measured with `kl=True`."""
        self._clean: tuple[Tensor, Tensor] | None = None

    def clean(self, logits: Tensor, tokens: Tensor) -> Tensor:
        """Start a batch with the clean run's logits [B, T, V]; returns its log-probs [B, T-1, V]."""
        logp, ce = next_token_logprobs(logits, tokens)
        self.ce_clean += float(ce.sum())
        self.n += ce.numel()
        self._clean = (logp, logp.exp())
        return logp

    def run(self, name: Hashable, logits: Tensor, tokens: Tensor, kl: bool = True) -> Tensor:
        """Add another run's logits on the current batch (and its KL unless `kl` is False); its log-probs."""
        if self._clean is None:
            raise RuntimeError("NextTokenLoss.run before clean(): the clean run of a batch comes first")
        logp, ce = next_token_logprobs(logits, tokens)
        self.ce[name] = self.ce.get(name, 0.0) + float(ce.sum())
        if kl:
            logp_clean, p_clean = self._clean
            self.kl[name] = self.kl.get(name, 0.0) + float((p_clean * (logp_clean - logp)).sum())
        return logp

    def mean_ce_clean(self) -> float:
        """Mean CE per predicted token of the clean run."""
        return self.ce_clean / max(self.n, 1)

    def mean_ce(self, name: Hashable) -> float:
        """Mean CE per predicted token of run `name`."""
        return self.ce[name] / max(self.n, 1)

    def mean_kl(self, name: Hashable) -> float:
        """Mean KL(clean || run `name`) per predicted token."""
        return self.kl[name] / max(self.n, 1)
