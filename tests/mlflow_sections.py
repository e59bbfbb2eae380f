"""How the MLflow run page groups metric charts, for tests of metric naming.

The locked MLflow's UI (``ChartUtils.extractChartSectionName`` and
``getBaseChartAndSectionConfigs`` in mlflow/server/js/build) files a chart under its key up to
the last ``/``; it lists those sections in JavaScript's default sort order (UTF-16 code
units: for ASCII keys, Python's string order), then the default section (keys without a
``/``) and the system-metrics section (``system/...``) last.
"""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT_SECTION, SYSTEM_SECTION = "Model metrics", "system"


def ui_sections(keys: Iterable[str]) -> list[str]:
    """The chart sections of a run with these metric keys, in the order the UI lists them."""
    named = {k.rsplit("/", 1)[0] if "/" in k else DEFAULT_SECTION for k in keys}
    last = [s for s in (DEFAULT_SECTION, SYSTEM_SECTION) if s in named]
    return sorted(named - set(last)) + last
