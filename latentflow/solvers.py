"""Names that pipeline folders written by latentflow 0.1.0 import from here (their `pipeline.py` says
`from latentflow.solvers import ADAPTIVE_METHODS, FIXED_STEP_METHODS, ddim_sample, integrate`). New code imports
`latentflow.flow.solvers`."""

from latentflow.flow.solvers import ADAPTIVE_METHODS, FIXED_STEP_METHODS, ddim_sample, integrate

__all__ = ["ADAPTIVE_METHODS", "FIXED_STEP_METHODS", "ddim_sample", "integrate"]
