"""zerofx's graph passes. The pipeline (which passes run, in what order, and the runner)
is in ``pipeline``; what a pass receives is in ``context``; each pass is a module of its own.
"""
from zerofx.passes.context import GRAPH_KINDS, PassContext, PassSpec
from zerofx.passes.pipeline import (build_pipeline, check_order, declared_passes,
                                    partitioner, run_partitioned, run_pipeline,
                                    trace_artifact)

__all__ = ["GRAPH_KINDS", "PassContext", "PassSpec", "build_pipeline", "check_order",
           "declared_passes", "partitioner", "run_partitioned", "run_pipeline",
           "trace_artifact"]
