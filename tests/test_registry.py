"""The one registry type behind every design axis (ditlab.registry)."""

import pytest

from ditlab.diffusion.interpolant import PATHS
from ditlab.diffusion.sampling import SAMPLERS
from ditlab.models import BLOCKS, DIT_SIZES, MLPS, NORMS, POS_EMBEDS
from ditlab.registry import Registry


def test_registry_names_classes_refuses_a_second_entry_and_names_the_valid_ones():
    widgets = Registry("widget")

    @widgets.register("round")
    class Round:
        pass

    assert widgets["round"] is Round and Round.name == "round"
    assert widgets.register("round", Round) is Round  # the same entry again (a module imported twice)
    assert widgets.register("square", 4) == 4 and widgets.register("square", 4) == 4  # equal entries too
    with pytest.raises(ValueError, match=r"^widget 'round' is already registered as .*Round$"):
        widgets.register("round")(type("Other", (), {}))
    with pytest.raises(ValueError, match=r"^unknown widget 'oval'; valid widgets: round, square$"):
        widgets["oval"]
    assert "oval" not in widgets and widgets.get("oval") is None and list(widgets) == ["round", "square"]


def test_every_axis_is_a_registry_of_its_config_key():
    kinds = {id(r): r.kind for r in (BLOCKS, DIT_SIZES, NORMS, MLPS, POS_EMBEDS, PATHS, SAMPLERS)}
    assert sorted(kinds.values()) == ["block", "mlp", "model size", "norm", "path", "pos_embed", "sampler"]
    for registry in (BLOCKS, PATHS, SAMPLERS):  # classes: each knows the name it is registered under
        assert all(entry.name == name for name, entry in registry.items())
