"""Library messages of every training run that a user cannot act on, silenced one by one, by their exact
text. What comes from ditlab's own use of a library is fixed where it arises instead (no `val_dataloader`
without a validation loop; the EMA copy in train mode like the rest of the module)."""

import logging
import warnings


class _NoLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip: ")


_NO_TIPS = _NoLightningTips()


def silence_library_messages() -> None:
    """Idempotent: a sweep calls it once per job."""
    # Lightning advertises litlogger / litmodels on every Trainer; no Trainer option turns that off.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NO_TIPS)
    # Lightning 2.6's metric flattening builds torch's deprecated LeafSpec (their code, not a call of ours).
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
