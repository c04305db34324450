"""The files an ONNX graph reads beside itself: the `location` of every tensor kept as external data.

A bundle's manifest names its graphs and the files their tensors are kept in, but the graph names those
files itself, and ONNX Runtime opens whatever it names. So the loader reads the names from the graph and
checks them before ONNX Runtime sees it (recent versions refuse a location outside the graph's folder, but
a device may run an older one). Read from the protobuf wire format directly, without the `onnx` package
that the runtime does not carry: only the fields on the way to a tensor are parsed, and tensor data is
skipped unread.

Field numbers are onnx.proto's: ModelProto.graph 7, .functions 25; GraphProto.node 1, .initializer 5,
.sparse_initializer 15; NodeProto.attribute 5; AttributeProto.t 5, .g 6, .tensors 10, .graphs 11,
.sparse_tensor 22, .sparse_tensors 23; FunctionProto.node 7; SparseTensorProto.values 1, .indices 2;
TensorProto.external_data 13; StringStringEntryProto.key 1, .value 2.
"""

from __future__ import annotations

import mmap
from pathlib import Path

# message kind -> {field number: the kind of message that field holds}; fields not listed are skipped
_CHILDREN = {
    "model": {7: "graph", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}


class MalformedGraph(ValueError):
    pass


def _varint(buf, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise MalformedGraph("truncated varint")
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def _submessages(buf, start: int, end: int):
    """(field number, start, end) of every length-delimited field of the message in buf[start:end]."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        wire = key & 7
        if wire == 0:
            _, i = _varint(buf, i, end)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = _varint(buf, i, end)
            if i + length > end:
                raise MalformedGraph("a field runs past its message")
            yield key >> 3, i, i + length
            i += length
        else:  # groups (3, 4) are not in onnx.proto
            raise MalformedGraph(f"wire type {wire}")
    if i != end:
        raise MalformedGraph("a field runs past its message")


def external_locations(path: str | Path) -> set[str]:
    """The `location` of every tensor in the graph (subgraphs and functions included) kept as external data."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return set()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            locations = set()
            stack = [("model", 0, len(buf))]  # a stack, not recursion: nesting depth is the file's to choose
            while stack:
                kind, start, end = stack.pop()
                if kind == "entry":
                    entry = {n: buf[a:b] for n, a, b in _submessages(buf, start, end)}
                    if entry.get(1) == b"location":
                        locations.add(entry.get(2, b"").decode("utf-8", errors="replace"))
                    continue
                children = _CHILDREN[kind]
                stack += [(children[n], a, b) for n, a, b in _submessages(buf, start, end) if n in children]
            return locations
