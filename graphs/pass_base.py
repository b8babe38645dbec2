"""The pass framework: a pass rewrites an ExportedProgram's graph in place and reports itself.

A pass matches around an anchor node. ``match`` returns either a ``Match`` (what to rewrite) or
a ``Miss`` naming why the anchor was refused and the value at fault; ``rewrite`` then replaces
the matched subgraph. A pass that matches nothing leaves the graph untouched.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten


@dataclasses.dataclass
class Miss:
    """Why a pass refused an anchor: the reason, and the node or value at fault."""

    anchor: str
    reason: str

    def __str__(self) -> str:
        return f"{self.anchor}: {self.reason}"


@dataclasses.dataclass
class PassReport:
    name: str
    fired: int = 0
    misses: list[Miss] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "fired": self.fired, "misses": [str(m) for m in self.misses]}


@dataclasses.dataclass
class PassContext:
    """What a pass may read besides the graph: the model config and the program's tensors."""

    config: Any
    program: torch.export.ExportedProgram

    def placeholder_tensor(self, node: fx.Node) -> torch.Tensor | None:
        """The parameter, buffer or constant behind a placeholder node, or None for user inputs."""
        if node.op != "placeholder":
            return None
        for spec in self.program.graph_signature.input_specs:
            if spec.arg.name != node.name or spec.target is None:
                continue
            for table in (self.program.state_dict, self.program.constants):
                if spec.target in table:
                    return table[spec.target]
        return None

    def is_user_input(self, node: fx.Node) -> bool:
        kind = torch.export.graph_signature.InputKind.USER_INPUT
        return any(
            spec.arg.name == node.name and spec.kind is kind
            for spec in self.program.graph_signature.input_specs
        )


class GraphPass:
    """Base class: subclasses set ``name`` and ``anchor`` and implement ``match``/``rewrite``."""

    name: str = ""
    anchor: Any = None

    def match(self, node: fx.Node, ctx: PassContext) -> Any:
        raise NotImplementedError

    def rewrite(self, graph: fx.Graph, node: fx.Node, match: Any, ctx: PassContext) -> None:
        raise NotImplementedError

    def __call__(self, ctx: PassContext) -> PassReport:
        report = PassReport(self.name)
        graph = ctx.program.graph_module.graph
        for node in list(graph.nodes):
            if not is_op(node, self.anchor):
                continue
            found = self.match(node, ctx)
            if isinstance(found, Miss):
                report.misses.append(found)
                continue
            self.rewrite(graph, node, found, ctx)
            report.fired += 1
        if report.fired:
            eliminate_dead_code(graph)
            ctx.program.graph_module.recompile()
        return report


def is_op(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def op_name(node: fx.Node) -> str:
    """'namespace.op' for an ATen/custom op (overload dropped), 'operator.x' for Python operators."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    if getattr(target, "__module__", None) == "_operator":
        return f"operator.{target.__name__}"
    return str(target)


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument by position or keyword, as the schema allows either."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def fake_value(target: Any, *args: Any) -> Any:
    """Run ``target`` on the fake values of node arguments, for a new node's ``meta['val']``."""
    from torch._guards import detect_fake_mode

    vals = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    with mode:
        return target(*vals)


def call(graph: fx.Graph, target: Any, *args: Any, like: fx.Node | None = None) -> fx.Node:
    """Insert a call before the current insertion point, with its fake value and provenance."""
    node = graph.call_function(target, tuple(args))
    if target is operator.getitem:  # an element of a multi-output op's (fake) result
        node.meta["val"] = args[0].meta["val"][args[1]]
    else:
        node.meta["val"] = fake_value(target, *args)
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    return node


def eliminate_dead_code(graph: fx.Graph) -> None:
    """DCE that also drops trace-time metadata assertions left on otherwise dead values."""
    for node in list(graph.nodes):
        if is_op(node, aten._assert_tensor_metadata.default):
            graph.erase_node(node)
    graph.eliminate_dead_code()


def ancestors(node: fx.Node, stop: Any = None) -> set[fx.Node]:
    """All nodes ``node`` depends on, not walking past nodes for which ``stop(n)`` is true."""
    seen: set[fx.Node] = set()
    todo = list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if stop is None or not stop(n):
            todo.extend(n.all_input_nodes)
    return seen
