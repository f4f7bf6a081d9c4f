"""Readable, unique and stable layer names for the nodes of an ONNX graph."""
from __future__ import annotations

import ast
import functools
import keyword
import re

# The layer names a featureshift export gives its nodes come from torch's module paths; the
# exporter keeps the path of each node here (onnx's version converter drops it, so the names
# are set before converting).
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# Attributes featureshift sets on a converted network (see convert): no layer may be called so.
NETWORK_ATTRIBUTES = frozenset({"initializers", "featureshift_info", "featureshift_layouts", "featureshift_input_hw",
                                "num_prefix_tokens"})


def node_names(graph) -> dict[str, str]:
    """A readable, unique layer name for every node, keyed by node_key.

    torch's default exporter records each node's module path (`features.3.squeeze`), the old
    exporter and tf2onnx put it in the node name (`/features/features.3/squeeze/Conv`,
    `model/block1_conv1/Conv2D`); either way the name is the path plus the operator, e.g.
    `features.3.squeeze.Conv`. The parts are joined by "/" here, as onnx2torch takes them
    (it allows no dots in a module's name), and by "." in the converted module. The same graph
    always gets the same names.
    """
    raw = [name_parts(node) for node in graph.node]
    leaves = ["/".join(parts) for parts in raw]
    used: set[str] = set()
    containers = {"/".join(parts[:i]) for parts in raw for i in range(1, len(parts))}
    out = {}
    for node, name in zip(graph.node, leaves):
        unique, k = name, 0
        # a name that is also another's prefix would make one module both a layer and a folder
        while unique in used or unique in containers:
            k += 1
            unique = f"{name}_{k}"
        used.add(unique)
        out[node_key(node)] = unique
    return out


def node_key(node) -> str:
    """What identifies a node across graph edits: its first output (else its name)."""
    return node.output[0] if node.output and node.output[0] else f"#{node.name}"


def name_parts(node) -> list[str]:
    """The pieces of a node's layer name: its module path or scope, then its operator."""
    scopes = next((p.value for p in node.metadata_props if p.key == SCOPES_KEY), None)
    if scopes is not None:
        try:  # written as a Python list literal: ['', 'features', 'features.3', 'conv2d_1']
            path = [str(s) for s in ast.literal_eval(scopes)[:-1] if s]
        except (ValueError, SyntaxError, TypeError):
            path = []
        module = path[-1].split(".") if path else []
        return clean(module + [node.op_type])
    if not node.name:
        return clean([node.op_type])
    return clean(scope_path(node.name) or [node.op_type])


def scope_path(name: str) -> list[str]:
    """The parts of a "/"-separated scope, repeated pieces collapsed.

    Exporters repeat a scope's path in the scopes inside it: torch's old exporter names a node
    `/features/features.3/squeeze/Conv` and YOLOv8's head `/model.22/cv2.0/cv2.0.0/act/Mul`.
    The rule: a scope piece that begins with the end of the path so far (its last parts, dot-
    joined) only adds what follows, so these become `features.3.squeeze.Conv` and
    `model.22.cv2.0.0.act.Mul` (the modules' own paths). A piece that merely equals the end of
    the path (`model/model/...`, a module holding one of the same name) is kept.
    """
    parts: list[str] = []
    for piece in name.split("/"):
        if not piece or piece in ("StatefulPartitionedCall", "PartitionedCall"):
            continue
        pieces = piece.split(".")
        overlap = next((k for k in range(min(len(parts), len(pieces) - 1), 0, -1) if parts[-k:] == pieces[:k]), 0)
        parts.extend(pieces[overlap:])
    return parts


@functools.cache
def reserved() -> frozenset[str]:
    # Attributes of the module classes the names become children of: a child called `train`
    # or `graph` would be shadowed by the method or break the generated forward.
    from torch import fx

    return frozenset(dir(fx.GraphModule)) | NETWORK_ATTRIBUTES


def clean(parts: list[str]) -> list[str]:
    """Name pieces as Python identifiers that no module attribute shadows."""
    out = []
    for p in parts:
        p = re.sub(r"\W+", "_", p).strip("_") or "_"
        if keyword.iskeyword(p) or p in reserved():
            p += "_"
        out.append(p)
    return out
