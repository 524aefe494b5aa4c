"""Test-wide set-up: the persistent compilation cache, and where the shared data lives."""

import os
import pathlib

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Compiled programs are cached across test runs (and across the tests of one run that compile the same
# program), which is most of the suite's time on a 2-core CPU.
jax.config.update("jax_compilation_cache_dir", os.environ.get("MSDFUSE_JAX_CACHE", str(REPO / ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def shared_file(*parts: str) -> pathlib.Path:
  """A file of ../shared, or a skip naming it when the checkout has no ../shared beside it."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"{path} not found: these tests need ../shared beside the repository")
  return path
