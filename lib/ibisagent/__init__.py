"""ibisagent: agentic interactive biomedical image segmentation (the IBISAgent method) as a product.

The modules follow the method's concepts: :mod:`ibisagent.protocol` (action grammar), :mod:`ibisagent.clicks`
(click simulator), :mod:`ibisagent.metrics`, :mod:`ibisagent.tools` (click-driven segmenters),
:mod:`ibisagent.imaging`, :mod:`ibisagent.data` (manifests, trajectories), :mod:`ibisagent.evaluate`.
"""

__version__ = "0.1.0"
