"""The callbacks of a ditlab run, one file each."""

from ditlab.training.callbacks.checkpointing import Checkpointing
from ditlab.training.callbacks.fid_monitor import FIDMonitor
from ditlab.training.callbacks.posthoc_ema import PostHocEMA
from ditlab.training.callbacks.progress import LineProgress, progress_bar
from ditlab.training.callbacks.run_record import RESULTS_FILE, RunRecord, update_run_record
from ditlab.training.callbacks.sample_grid import SampleGrid
from ditlab.training.callbacks.throughput import Throughput

__all__ = [
    "RESULTS_FILE",
    "Checkpointing",
    "FIDMonitor",
    "LineProgress",
    "PostHocEMA",
    "RunRecord",
    "SampleGrid",
    "Throughput",
    "progress_bar",
    "update_run_record",
]
