"""FID against Gflops for a sweep: the paper's Table 4 (markdown and CSV) and its figures.

python src/report.py runs=multirun/2026-01-31_12-00-00             # one sweep folder (searched recursively)
python src/report.py 'runs=[multirun/<table4>,multirun/<ablation>]'  # several
python src/report.py wandb=my-team/ditlab wandb_group=2026-01-31_12-00-00   # from W&B (network)
options: out=reports/<time> (the report folder), log_wandb=true (also log a W&B report run)

Writes table4.md/.csv, blocks.md/.csv (when the block varies), fid_vs_gflops.png, fid_vs_compute.png.
"""

import sys

from ditlab.report import main

if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
    else:
        main(sys.argv[1:])
