"""Task-vector merging on real suites: the method comparison (``task-vectors``) and the per-block CMA-ES
search (``task-vector-search``).

``study``: CART vs task arithmetic, TIES, DARE, Model Stock, Fisher, RegMean (tables, sweeps, verdicts);
``bench``: merges and scores on a :class:`~mergelab.zoo.task_suite.TaskSuite` with hyper-parameters chosen on
validation; ``plots``: its figures; ``search``: the search study. ``run`` here is the ``task-vectors`` study.
"""

from mergelab.studies.task_vectors.study import SUITES, Plan, make_suite, run, run_suite

__all__ = ["SUITES", "Plan", "make_suite", "run", "run_suite"]
