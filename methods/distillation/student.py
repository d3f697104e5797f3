"""Which teacher layers a shallower student keeps (no METHOD here).

``slimbench.layerwise.drop_layers`` then removes the others for real (the decoder's ModuleList,
the config's layer count and layer types, each kept layer's cache index). The kept layers'
weights are the teacher's own (DistilBERT-style initialisation).
"""

from __future__ import annotations


def kept_layers(depth: int, keep_every: int | None, student_layers: int | None) -> list[int]:
    """Indices of the teacher layers the student keeps.

    ``keep_every=k``: layers 0, k, 2k, ... (DistilBERT's every-other-layer with k=2).
    ``student_layers=n``: n layers evenly spaced from the first to the last (both kept: the
    first and last layers are the ones whose removal hurts most).
    """
    if student_layers is not None:
        if student_layers > depth:
            raise ValueError(f"student_layers {student_layers} is deeper than the teacher's {depth} decoder layers")
        if student_layers == 1:
            return [0]
        return sorted({round(i * (depth - 1) / (student_layers - 1)) for i in range(student_layers)})
    k = keep_every or 2
    return list(range(0, depth, k))
