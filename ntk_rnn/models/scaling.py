"""The scalings every model of the package shares (theory §3, §4), written once so that the time
t = k/N, the learning rate and the normalised NTK mean the same for MeanFieldRNN, ElmanRNN and
GRURNN."""

from __future__ import annotations

from ..records import RecordsArgs


class MeanFieldScaling(RecordsArgs):
    """Readout N^{-β}, normalised kernel N^{2β−1}, learning rate α N^{2β−2}; the class sets
    ``width`` (N) and ``beta`` (β)."""

    width: int
    beta: float

    @property
    def output_scale(self) -> float:
        """N^{-β}, the factor in Ŷ = N^{-β} Σ c_i S_i."""
        return self.width ** (-self.beta)

    @property
    def ntk_scale(self) -> float:
        """N^{2β-1}, turning ∇f·∇f' into the O(1) normalised kernel of theory §4."""
        return self.width ** (2.0 * self.beta - 1.0)

    def learning_rate(self, alpha: float) -> float:
        """α_N = α N^{2β-2} (theory §3)."""
        return float(alpha) * self.width ** (2.0 * self.beta - 2.0)


    def at_width(self, width: int, seed: int):
        """The same network (its recorded constructor arguments ``init_args``) at width
        ``width`` with θ_0 drawn from ``seed``, in this network's dtype and device — what the
        Monte-Carlo limit draws (``ntk_rnn.models.family``)."""
        if not isinstance(getattr(self, "init_args", None), dict):
            raise NotImplementedError("at_width needs the constructor arguments (init_args)")
        p = next(iter(self.parameters()))
        args = {k: v for k, v in self.init_args.items() if k not in ("generator", "dtype",
                                                                    "device")}
        args.update(width=int(width), seed=int(seed))
        return type(self)(**args, dtype=p.dtype, device=p.device)


class RecurrentScaling(MeanFieldScaling):
    """MeanFieldScaling plus a full recurrent matrix entering as N^{-γ} (``gamma``: 1 for
    mean-field, 1/2 for NTK scaling) and a memory of size N (what truncated BPTT keeps)."""

    gamma: float

    @property
    def recurrent_scale(self) -> float:
        """N^{-γ}, the factor in front of the recurrent matrix times the memory."""
        return self.width ** (-self.gamma)

    @property
    def memory_dim(self) -> int:
        """Size of the memory carried between steps (the BPTT stepper keeps it)."""
        return self.width
