"""YAML loading where ``1e-3`` is a number, as in YAML 1.2 (and DVC, which writes params).

PyYAML follows YAML 1.1, whose float pattern needs a dot: ``lr: 1e-3`` or ``--set
optim.lr=1e-3`` would load as the *string* ``"1e-3"``. :func:`load_yaml` is PyYAML's safe
loader with the YAML 1.2 float pattern added; everything else loads as with ``safe_load``.
"""

from __future__ import annotations

import re
from typing import IO, Any

import yaml

__all__ = ["load_yaml"]

#: YAML 1.2 core schema floats, plus YAML 1.1's forms that ``safe_load`` already accepts.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 floats."""


# Replace the inherited float resolver (resolvers are per first character).
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load_yaml(stream: str | bytes | IO[str] | IO[bytes]) -> Any:
    """Parse one YAML document safely (as ``yaml.safe_load``), ``1e-3`` being a float."""
    return yaml.load(stream, Loader=_Loader)
