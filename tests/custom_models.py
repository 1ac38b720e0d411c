"""A user's own RNN, as the README's "Your own model" section writes it (model=custom)."""

import torch
from torch import nn


class TinyRNN(nn.Module):
    """h_{k+1} = tanh(W x_k + U h_k / N), Ŷ_k = N^{-β} c·h_{k+1}; windows (B, L, d) -> (B, L)."""

    def __init__(self, input_dim: int, width: int = 16, beta: float = 0.75):
        super().__init__()
        self.input_dim, self.width, self.beta = input_dim, width, beta
        hidden = width
        self.W = nn.Parameter(torch.randn(hidden, input_dim) / input_dim ** 0.5)
        self.U = nn.Parameter(torch.randn(hidden, hidden))
        self.c = nn.Parameter(torch.rand(hidden) * 2 - 1)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.width)
        out = []
        for k in range(x.shape[1]):
            h = torch.tanh(x[:, k] @ self.W.T + h @ self.U.T / self.width)
            out.append(h @ self.c * self.width ** -self.beta)
        return torch.stack(out, 1)


class WrongOutput(TinyRNN):
    def forward(self, x):
        return super().forward(x)[:, -1]


class NoParameters(nn.Module):
    def __init__(self, input_dim: int):
        super().__init__()
        self.input_dim = input_dim

    def forward(self, x):
        return x.sum(-1)


class NoInputDim(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.lin = nn.Linear(width, 1)

    def forward(self, x):
        return x.sum(-1)


class Raises(TinyRNN):
    def __init__(self, input_dim: int):
        raise ValueError("my model is broken")
