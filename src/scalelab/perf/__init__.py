"""Performance model: project time-to-train of a workload on other hardware, checked against published
records.

Public API:
    >>> from scalelab.perf import Setup, Steps, load_catalog, project, workload
    >>> p = project(Setup(workload("resnet50"), "h100", 64, 3200, Steps(epochs=35), 8, "8xib-ndr"))
    >>> 100 < p.total_s < 250
    True
"""

from scalelab.perf.catalog import Catalog, load_catalog
from scalelab.perf.project import Projection, Setup, project
from scalelab.perf.stats import Steps
from scalelab.perf.workload import Workload, workload

__all__ = ["Catalog", "load_catalog", "Workload", "workload", "Projection", "Setup", "Steps", "project"]
