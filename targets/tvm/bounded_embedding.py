"""Token ids bounded inside the compiled code: the embedding lookup clamps its index.

``qwen2c.load`` refuses out-of-range ids in Python, but the library is also reachable with other
ids (a caller of the runtime, an edited manifest): TVM's importer lowers ``aten.embedding`` to a
``take`` in "fast" mode, an unchecked load, after casting the ids to int32. Here the lookup is a
``take`` in "clip" mode on the int64 ids: any id reads a row of the table, never memory beyond it.
"""

from __future__ import annotations

from tvm import relax
from torch import fx


def bounded_embedding(node: fx.Node, importer) -> relax.Var:
    bb = importer.block_builder
    weight, ids = importer.env[node.args[0]], importer.env[node.args[1]]
    flat = bb.emit(relax.op.reshape(ids, [-1]))
    rows = bb.emit(relax.op.take(weight, flat, axis=0, mode="clip"))
    return bb.emit(relax.op.reshape(rows, [*ids.ty.shape.values, weight.ty.shape.values[-1]]))


CONVERTERS = {"embedding.default": bounded_embedding}
