"""Pure JAX likelihood: compile (pyhf model -> arrays), logpdf, sample, fit, test statistics.

No I/O and no knowledge of tasks or stores. JAX runs in 64 bit: the fits need it.
"""

import jax

jax.config.update("jax_enable_x64", True)

from toyfarm.likelihood.compile import Likelihood, compile_model  # noqa: E402
from toyfarm.likelihood.logpdf import expected_rates, logpdf, nll_derivatives  # noqa: E402

__all__ = ["Likelihood", "compile_model", "expected_rates", "logpdf", "nll_derivatives"]
