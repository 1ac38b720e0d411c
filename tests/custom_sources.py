"""Custom SequenceSources defined outside the package, plugged in by `data._target_` in tests."""

import torch


class SineChain:
    """X_k = sin(ω k + φ) + noise in R^1, Y_k = X_{k-1}: a user's own source."""

    input_dim = 1

    def __init__(self, omega: float = 0.3, noise: float = 0.1):
        self.omega, self.noise = omega, noise

    def stream(self, generator, chunk_size):
        phase = float(torch.rand((), generator=generator, dtype=torch.float64)) * 6.283
        k, prev = 0, 0.0
        while True:
            idx = torch.arange(k, k + chunk_size, dtype=torch.float64)
            x = torch.sin(self.omega * idx + phase)
            x = x + self.noise * torch.randn(chunk_size, generator=generator, dtype=torch.float64)
            y = torch.cat([torch.tensor([prev], dtype=torch.float64), x[:-1]])
            prev = float(x[-1])
            k += chunk_size
            yield x[:, None], y

    def windows(self, n, length, generator):
        phase = torch.rand(n, 1, generator=generator, dtype=torch.float64) * 6.283
        idx = torch.arange(length + 1, dtype=torch.float64)
        x = torch.sin(self.omega * idx + phase)
        x = x + self.noise * torch.randn(n, length + 1, generator=generator, dtype=torch.float64)
        return x[:, 1:, None], x[:, -2]


class WrongShape(SineChain):
    """Yields X of shape (T, 2) while claiming input_dim = 1."""

    def stream(self, generator, chunk_size):
        while True:
            yield torch.zeros(chunk_size, 2, dtype=torch.float64), torch.zeros(chunk_size)
