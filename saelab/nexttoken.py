"""Next-token loss of a model's runs on the same tokens: CE of each, KL of each against the clean run.

Evals (the SAE spliced in, zero ablation) and steering (each intervention) measure the same two
things over batches of held-out text; `NextTokenLoss` is that accumulation, written once.
"""

from __future__ import annotations

from torch import Tensor


def next_token_logprobs(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(log-softmax [B, T-1, V], CE per position [B, T-1]) for next-token prediction."""
    logp = logits[:, :-1].float().log_softmax(-1)
    ce = -logp.gather(-1, tokens[:, 1:, None].to(logp.device)).squeeze(-1)
    return logp, ce


class NextTokenLoss:
    """Summed next-token CE of a clean run and of named runs, and KL(clean || run), over batches.

    Per batch: `clean(logits, tokens)` first, then `run(name, logits, tokens)` for each other run on
    the same tokens. `mean_ce` / `mean_kl` divide by the number of predicted tokens.
    """

    CLEAN = "clean"

    def __init__(self) -> None:
        self.n = 0
        """Predicted tokens so far."""
        self.ce: dict[str, float] = {}
        self.kl: dict[str, float] = {}
        self._clean: tuple[Tensor, Tensor] | None = None

    def clean(self, logits: Tensor, tokens: Tensor) -> Tensor:
        """Start a batch with the clean run's logits [B, T, V]; returns its log-probs [B, T-1, V]."""
        logp, ce = next_token_logprobs(logits, tokens)
        self._add_ce(self.CLEAN, ce)
        self.n += ce.numel()
        self._clean = (logp, logp.exp())
        return logp

    def run(self, name: str, logits: Tensor, tokens: Tensor, kl: bool = True) -> Tensor:
        """Add another run's logits on the current batch (and its KL unless `kl` is False); its log-probs."""
        if self._clean is None:
            raise RuntimeError("NextTokenLoss.run before clean(): the clean run of a batch comes first")
        logp, ce = next_token_logprobs(logits, tokens)
        self._add_ce(name, ce)
        if kl:
            logp_clean, p_clean = self._clean
            self.kl[name] = self.kl.get(name, 0.0) + float((p_clean * (logp_clean - logp)).sum())
        return logp

    def _add_ce(self, name: str, ce: Tensor) -> None:
        self.ce[name] = self.ce.get(name, 0.0) + float(ce.sum())

    def mean_ce(self, name: str = CLEAN) -> float:
        """Mean CE per predicted token of run `name` (the clean run by default)."""
        return self.ce[name] / max(self.n, 1)

    def mean_kl(self, name: str) -> float:
        """Mean KL(clean || run `name`) per predicted token."""
        return self.kl[name] / max(self.n, 1)
