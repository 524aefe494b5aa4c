"""Regenerates msdfuse_jax/evaluation/torch_prior.npy: the reference's float32 exit priors, from torch.

The budgeted reference computes its prior over exits with torch float32 kernels
(``exp(log(q) * k) / sum``); torch's CPU ``log``/``exp``/``sum`` are not correctly rounded, so numpy cannot
reproduce them bit for bit, and a 1-ULP difference can move ``floor(N * prior_k)`` by one. The table holds
torch's values for p = 1..39 and K = 1..MAX_EXITS. Run with torch installed (the checked-in table was made
with torch 2.13.0, CPU build, on an x86-64 machine):

  python experiments/make_torch_prior_table.py
"""

import pathlib

import numpy as np
import torch

MAX_EXITS = 24


def main() -> None:
  table = np.zeros((40, MAX_EXITS + 1, MAX_EXITS), np.float32)  # [p, K, k]; unused rows stay 0
  for p in range(1, 40):
    for k in range(1, MAX_EXITS + 1):
      q = torch.FloatTensor(1).fill_(p * 1.0 / 20)
      prior = torch.exp(torch.log(q) * torch.arange(1, k + 1, dtype=torch.float32))
      prior /= prior.sum()
      table[p, k, :k] = prior.numpy()
  out = pathlib.Path(__file__).resolve().parents[1] / "msdfuse_jax" / "evaluation" / "torch_prior.npy"
  np.save(out, table)
  print(f"wrote {out} (torch {torch.__version__})")


if __name__ == "__main__":
  main()
