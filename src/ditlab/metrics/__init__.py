"""Metrics: Gflops and parameters; FID, sFID, IS and precision/recall."""

from ditlab.metrics.flops import count_params, forward_flops, gflops

__all__ = ["count_params", "forward_flops", "gflops"]
