"""Router traces: a versioned on-disk format, a recorder, converters, statistics and a synthetic generator.

``load(path)`` reads any supported format, ``Trace.save(path)`` writes Prophet's own (``traces/FORMAT.md``),
``record(model, path)`` captures a model's routing while it runs. Statistics live in `prophet.trace.stats`,
plots in `prophet.trace.plots` (``figures`` extra), the synthetic generator in `prophet.trace.synth`.
"""

from prophet.trace.format import (
    FORMAT_VERSION,
    Phase,
    SketchInfo,
    Trace,
    TraceModel,
    TraceWriter,
    check_compatible,
)
from prophet.trace.readers import load
from prophet.trace.recorder import Recorder, record, trace_model

__all__ = [
    "FORMAT_VERSION",
    "Phase",
    "Recorder",
    "SketchInfo",
    "Trace",
    "TraceModel",
    "TraceWriter",
    "check_compatible",
    "load",
    "record",
    "trace_model",
]
