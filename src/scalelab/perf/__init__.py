"""Performance model: project time-to-train of a workload on other hardware, checked against published
records.

Public API:
    >>> from scalelab.perf import load_catalog, workload, project, Setup
"""

from scalelab.perf.catalog import Catalog, load_catalog
from scalelab.perf.project import Projection, Setup, project
from scalelab.perf.workload import Workload, workload

__all__ = ["Catalog", "load_catalog", "Workload", "workload", "Projection", "Setup", "project"]
