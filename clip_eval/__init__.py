"""Evaluation suite: datasets, suites of tasks, reports (the files-and-models layer over the
pure metrics of :mod:`clip_core.zeroshot`, :mod:`clip_core.probe`, :mod:`clip_core.retrieval`
and :mod:`clip_core.robustness`)."""
