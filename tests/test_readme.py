"""README.md a newcomer can navigate: its design-space table names exactly what the registries and the config
groups hold, its test command is CI's, it links every docs/ page, and every relative link of the README, docs/
and experiments/README.md points to a file (and a heading) that exists."""

import json
import re
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONF = ROOT / "conf"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "experiments" / "README.md"]
MAX_README_LINES = 250  # the rest goes to one page per topic under docs/

# Each row of the README's design-space table: its axis (first column) → its key (second column) and where its
# values come from: a registry or a tuple of ditlab ("BLOCKS", ...) or a config group folder ("conf/block").
# A row's values must be exactly the union of its sources' names.
ROWS: dict[str, tuple[str, list[str]]] = {
    "conditioning block": ("block", ["BLOCKS", "conf/block"]),
    "size": ("model", ["DIT_SIZES", "conf/model"]),
    "patch": ("patch", ["PATCH_SIZES"]),
    "objective": ("diffusion", ["OBJECTIVES", "PATHS", "conf/diffusion"]),
    "DDPM prediction": ("diffusion.predict", ["DDPM_PREDICTIONS"]),
    "DDPM variance": ("diffusion.fixed_variance", ["FIXED_VARIANCES"]),
    "interpolant prediction": ("diffusion.predict", ["INTERPOLANT_PREDICTIONS"]),
    "interpolant loss": ("diffusion.loss", ["INTERPOLANT_LOSSES"]),
    "training times": ("diffusion.time_sampling", ["TIME_SAMPLINGS"]),
    "time shift": ("diffusion.time_shift", []),  # a number, not names
    "sampling time shift": ("sampler.options.time_shift", []),  # a number, not names
    "sampler": ("sampler", ["SAMPLERS", "conf/sampler"]),
    "guidance interval": ("cfg_interval", []),  # an interval, not names
    "autoguidance": ("guide.scale", []),  # a weight, not names
    "position embedding": ("pos_embed", ["POS_EMBEDS", "conf/pos_embed"]),
    "norm": ("norm", ["NORMS", "conf/norm"]),
    "QK-norm": ("qk_norm", ["BOOLEANS"]),
    "long skips": ("long_skip", ["BOOLEANS"]),
    "MLP": ("mlp", ["MLPS", "conf/mlp"]),
    "REPA": ("repa", ["conf/repa"]),
    "masked training": ("masking.mask_ratio", []),  # a number, not names
    "post-hoc EMA": ("callbacks.posthoc_ema.enabled", ["BOOLEANS"]),
    "MeanFlow's r ≠ t fraction": ("diffusion.fraction_r_neq_t", []),  # a number, not names
    "extra loss terms": ("loss_terms", ["LOSS_TERMS"]),
    "data": ("data", ["conf/data"]),
    "autoencoder": ("autoencoder", ["conf/autoencoder"]),
    "optimiser": ("optim", ["conf/optim"]),
    "trainer": ("trainer", ["conf/trainer"]),
    "logger": ("logger", ["conf/logger"]),
    "campaign": ("experiment", ["conf/experiment"]),
    "design point": ("+design_point", ["conf/design_point"]),
    "debug": ("debug", ["conf/debug"]),
}
NOT_AXES = {
    "callbacks",
    "paths",
    "hydra",
    "local",
}  # config groups that are no axis (docs/training.md lists them)
PATTERN = "<block>-p<patch>"  # a design point per block and paper patch size

# ditlab's registries and the tuples of valid values that a config's plain values are checked against, read in a
# fresh interpreter: tests in this one register entries of their own (and remove them again).
NAMES_CODE = """
import importlib, json, pkgutil
import ditlab.diffusion, ditlab.models
from ditlab.diffusion import gaussian_diffusion, interpolant
from ditlab.registry import Registry

registries = {}
for package in (ditlab.models, ditlab.diffusion):
    modules = [package] + [importlib.import_module(m.name) for m in pkgutil.iter_modules(package.__path__, package.__name__ + ".")]
    for module in modules:
        registries.update({name: list(value) for name, value in vars(module).items() if isinstance(value, Registry)})
print(json.dumps({
    "registries": registries,
    "tuples": {
        "PATCH_SIZES": [str(p) for p in ditlab.models.PATCH_SIZES],
        "DDPM_PREDICTIONS": list(gaussian_diffusion.PREDICTIONS),
        "FIXED_VARIANCES": list(gaussian_diffusion.FIXED_VARIANCES),
        "INTERPOLANT_PREDICTIONS": list(interpolant.PREDICTIONS),
        "INTERPOLANT_LOSSES": list(interpolant.LOSSES),
        "TIME_SAMPLINGS": list(interpolant.TIME_SAMPLINGS),
        "BOOLEANS": ["false", "true"],
    },
}))
"""


@pytest.fixture(scope="module")
def names() -> dict[str, dict[str, list[str]]]:
    proc = subprocess.run([sys.executable, "-c", NAMES_CODE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def section(text: str, heading: str) -> str:
    """The text under `## heading`, up to the next `## `."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def design_space_rows() -> dict[str, tuple[str, str]]:
    """The README's design-space table: axis → (key, values cell)."""
    rows = {}
    lines = [
        line for line in section(README.read_text(), "The design space").splitlines() if line.startswith("|")
    ]
    for line in lines[2:]:  # after the header and its separator
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        assert len(cells) == 4, f"a design-space row needs axis | key | values | one command: {line}"
        axis, key, values, command = cells
        assert axis not in rows, f"axis {axis!r} twice in the README's design-space table"
        assert command.startswith("`python src/"), f"row {axis!r}: one command, as `python src/...`"
        rows[axis] = (key.strip("`"), values)
    return rows


def code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def yaml_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def test_every_registry_and_config_group_has_its_row(names):
    rows = design_space_rows()
    assert set(rows) == set(ROWS), (
        f"README design-space rows without a check here: {sorted(set(rows) - set(ROWS))}; "
        f"rows missing from the README: {sorted(set(ROWS) - set(rows))}"
    )
    sources = {source for _, row_sources in ROWS.values() for source in row_sources}
    assert set(names["registries"]) <= sources, (
        "a registry of ditlab.models/ditlab.diffusion has no README row"
    )
    groups = {path.name for path in CONF.iterdir() if path.is_dir()}
    assert groups - NOT_AXES <= {source.removeprefix("conf/") for source in sources}, (
        "a config group has no row"
    )
    for axis, (key, _) in ROWS.items():
        assert rows[axis][0] == key, (
            f"README design-space row {axis!r}: key `{rows[axis][0]}`, expected `{key}`"
        )


@pytest.mark.parametrize("axis", [axis for axis, (_, sources) in ROWS.items() if sources])
def test_design_space_row_names_exactly_what_exists(axis, names):
    _, values = design_space_rows()[axis]
    listed = set(code_spans(values))
    _, sources = ROWS[axis]
    known = {**names["registries"], **names["tuples"]}
    expected = set()
    for source in sources:
        expected |= set(
            yaml_options(source.removeprefix("conf/")) if source.startswith("conf/") else known[source]
        )
    if PATTERN in listed:  # <block>-p<patch> stands for one name per block and paper patch size
        listed.remove(PATTERN)
        listed |= {f"{block}-p{patch}" for block, patch in product(known["BLOCKS"], known["PATCH_SIZES"])}
    assert not expected - listed, (
        f"README design-space row {axis!r} lacks {sorted(expected - listed)} ({sources})"
    )
    assert not listed - expected, (
        f"README design-space row {axis!r} names {sorted(listed - expected)}: not in {sources}"
    )


def test_readme_is_short_and_its_test_command_is_cis():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES, "README.md grew: move the detail to a page under docs/"
    commands = re.findall(r"^(make \w[\w-]*)\b", section(text, "Two commands"), flags=re.M)
    assert commands[:2] == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "make test" in ci and "make lint" in ci  # CI runs the README's command, then the linter
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", text))
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages not linked from README.md: {sorted(pages - linked)}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def without_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # fenced blocks
    return re.sub(r"`[^`\n]*`", "", text)  # inline code (link text keeps its brackets)


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(
        r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S), re.M
    ):
        base = slug(heading)
        result.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return result


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    links = re.findall(r"\]\(([^)\s]+)\)", without_code(page.read_text()))
    assert links or page.name != "README.md" or page.parent != ROOT, "the README links nothing"
    broken = []
    for link in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto:: not a file
            continue
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no {target})")
        elif fragment and target.suffix == ".md" and fragment not in anchors(target):
            broken.append(f"{link} (no heading #{fragment} in {target.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"
