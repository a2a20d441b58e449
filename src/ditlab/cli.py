"""What the entry points share: bad configurations end with one clear line, not a traceback."""

import os
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException


def run_cli(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Runs `fn(cfg)`; a ValueError/FileNotFoundError (our validation) or a config error exits with
    status 2 and its message. HYDRA_FULL_ERROR=1 shows the traceback."""
    try:
        return fn(cfg)
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
