"""Log levels of the worker protocol's ``RpcLog``, both ways."""

from __future__ import annotations

import logging

from devkit._protos import protos

_TO_RPC = ((logging.CRITICAL, "Critical"), (logging.ERROR, "Error"), (logging.WARNING, "Warning"),
           (logging.INFO, "Information"), (logging.DEBUG, "Debug"))


def rpc_level(levelno: int) -> int:
    """The ``RpcLog.Level`` for a ``logging`` level."""
    for threshold, name in _TO_RPC:
        if levelno >= threshold:
            return int(protos.RpcLog.Level.Value(name))
    return int(protos.RpcLog.Level.Value("Trace"))


def python_level(level: int) -> int:
    """The ``logging`` level for an ``RpcLog.Level``."""
    name = protos.RpcLog.Level.Name(level)
    return {"Critical": logging.CRITICAL, "Error": logging.ERROR, "Warning": logging.WARNING,
            "Information": logging.INFO}.get(name, logging.DEBUG)
