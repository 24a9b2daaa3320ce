"""The Functions worker protocol's generated classes, installed by ``scripts/setup.sh`` as ``functions_rpc``,
gathered in one namespace (every message, enum and the gRPC stub), as the runtime library expects them."""

from __future__ import annotations

import types
from typing import Any

try:
    from functions_rpc import FunctionRpc_pb2, FunctionRpc_pb2_grpc
    from functions_rpc.shared import NullableTypes_pb2
except ImportError as exc:  # pragma: no cover - a set-up problem, named for the user
    raise ImportError(
        "The Functions worker protocol classes (package functions_rpc) are missing: run scripts/setup.sh"
    ) from exc


def _gather(*modules: Any) -> Any:
    namespace = types.SimpleNamespace()
    for module in modules:
        for name in dir(module):
            if not name.startswith("_"):
                setattr(namespace, name, getattr(module, name))
    return namespace


protos: Any = _gather(NullableTypes_pb2, FunctionRpc_pb2, FunctionRpc_pb2_grpc)

__all__ = ["protos"]
