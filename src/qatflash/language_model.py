"""The causal-LM LightningModule: next-token loss on packed blocks, perplexity over whole splits.

Perplexity is exp(total NLL / scored tokens) summed over the split (torchmetrics' SumMetric,
synchronised across processes), never a mean of per-batch perplexities, which would weight a
short last window like a full one. Word-level perplexity divides the same total NLL by the
split's words, which makes it comparable across tokenizers. Every test window's summed NLL and
scored-token count are kept as the per-example results a bootstrap CI is computed from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import SumMetric

from qatflash.attention import forced_kernel
from qatflash.config import OptimConfig
from qatflash.data.language_modeling import IGNORE
from qatflash.module import TrainableModule

_STAGES = ("val", "test")


class CausalLanguageModel(TrainableModule):
    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        sdpa_backend: str | None = None,
        test_words: int = 0,
        test_tokens: int = 0,
    ) -> None:
        super().__init__(model, optim, sdpa_backend)
        # The test split's words and scored tokens: word perplexity's denominator (scaled to the
        # tokens scored when trainer.limit_test_batches scores only part of the split).
        self.test_words, self.test_tokens = test_words, test_tokens
        # nan_strategy="error": torchmetrics' default drops NaN with a warning, which turned an FP8
        # model's NaN logits into a loss of 0 and a perplexity of 1.
        self.sums = nn.ModuleDict(
            {
                f"{stage}_{total}": SumMetric(nan_strategy="error")
                for stage in _STAGES
                for total in ("nll", "tokens")
            }
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits; no attention mask: blocks are full and window padding comes after every scored token."""
        with forced_kernel(self.sdpa_backend):
            return self.model(input_ids=input_ids).logits

    def _next_token_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of every position that predicts a next token, and the targets they predict."""
        return self(batch["input_ids"])[:, :-1].float(), batch["labels"][:, 1:]

    def _nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's summed next-token NLL over its scored labels, and how many it scored."""
        return _summed_nll(*self._next_token_logits(batch))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, targets = self._next_token_logits(batch)
        nll, tokens = _summed_nll(logits, targets)
        inputs = {"input_ids": batch["input_ids"]}
        return self._training_loss(nll.sum() / tokens.sum(), logits, inputs, scored=targets != IGNORE)

    def _accumulate(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        nll, tokens = self._nll(batch)
        self.sums[f"{stage}_nll"].update(nll.sum())
        self.sums[f"{stage}_tokens"].update(tokens.sum())
        return nll, tokens

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._accumulate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Per window: its summed NLL and its scored tokens."""
        nll, tokens = self._accumulate(batch, "test")
        self._examples.append({"nll": nll, "tokens": tokens})

    def _log_perplexity(self, stage: str) -> tuple[float, float]:
        nll, tokens = (float(self.sums[f"{stage}_{total}"].compute()) for total in ("nll", "tokens"))
        for total in ("nll", "tokens"):
            self.sums[f"{stage}_{total}"].reset()
        self.log_dict({f"{stage}/loss": nll / tokens, f"{stage}/ppl": math.exp(nll / tokens)})
        return nll, tokens

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    def on_test_epoch_end(self) -> None:
        nll, tokens = self._log_perplexity("test")
        words = self.test_words * tokens / self.test_tokens
        self.log_dict({"test/word_ppl": math.exp(nll / words), "test/tokens": tokens, "test/words": words})


def _summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return nll.sum(dim=1), (targets != IGNORE).sum(dim=1)
