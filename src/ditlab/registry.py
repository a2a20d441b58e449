"""The registry of a design axis: one name → entry table per axis (blocks, sizes, norms, MLPs, position
embeddings, interpolant paths, samplers), which a config names and a user's module can extend."""

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

T = TypeVar("T")


class Registry(dict[str, T]):
    """A dict of one axis's entries, by name, that says what went wrong in one line.

    - `@REGISTRY.register("name")` on a class or function, or `REGISTRY.register("name", entry)`; a class gets
      `name` as an attribute. The same entry again is a no-op (a module imported twice); another entry under a
      taken name raises ValueError.
    - `REGISTRY["name"]` of a name not registered raises ValueError naming the valid ones (a config error).
    """

    def __init__(self, kind: str, entries: dict[str, T] | None = None) -> None:
        super().__init__(entries or {})
        self.kind = kind  # as the config says it: "block", "norm", "sampler", ...

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, entry: T) -> T: ...
    def register(self, name: str, entry: Any = None) -> Any:
        def add(entry: T) -> T:
            taken = self.get(name)
            if taken is not None and taken is not entry and taken != entry:
                owner = getattr(taken, "__qualname__", taken)
                raise ValueError(f"{self.kind} {name!r} is already registered as {owner}")
            if isinstance(entry, type):
                entry.name = name
            self[name] = entry
            return entry

        return add if entry is None else add(entry)

    def __missing__(self, name: str) -> T:
        raise ValueError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(sorted(self))}")


def locate(target: str) -> Any:
    """The object a dotted path names (a Hydra `_target_`), importing its module first: importing a user's
    module is what registers the entries it defines."""
    module, _, attribute = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"{target} cannot be imported ({error}); put its package on the Python path"
        ) from None


def unknown_options(target: Callable[..., Any], names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(the `names` that `target` takes no keyword argument for, the names it takes): a config key that
    no constructor reads fails in one line naming it, rather than as a TypeError or silently. None is
    unknown when `target` takes **kwargs."""
    params = inspect.signature(target).parameters
    valid = [name for name, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return [], valid
    return [name for name in names if name not in params], valid
