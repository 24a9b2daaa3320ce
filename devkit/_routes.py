"""HTTP routes from the indexed functions' ``httpTrigger`` bindings, matched as the Functions host does:
literal segments before parameters, parameters before catch-alls, case-insensitive, under ``routePrefix``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

_PARAM = re.compile(r"\{(\*?)([A-Za-z_][A-Za-z0-9_]*)(?::[^}?]*)?(\??)\}")


@dataclass(frozen=True, slots=True)
class Route:
    """One HTTP function's route."""

    function: str
    function_id: str
    arg_name: str
    template: str
    methods: frozenset[str] | None
    pattern: re.Pattern[str]
    rank: tuple[int, int, int]


def compile_route(template: str, prefix: str) -> tuple[re.Pattern[str], tuple[int, int, int]]:
    parts: list[str] = []
    literals = catch_alls = 0
    segments = [s for s in f"{prefix}/{template}".strip("/").split("/") if s]
    for segment in segments:
        match = _PARAM.fullmatch(segment)
        if match is None:
            literals += 1
            parts.append("/" + re.escape(segment.lower()))
        elif match.group(1):
            catch_alls += 1
            parts.append(f"(?:/(?P<{match.group(2)}>.*))?")
        elif match.group(3):
            parts.append(f"(?:/(?P<{match.group(2)}>[^/]+))?")
        else:
            parts.append(f"/(?P<{match.group(2)}>[^/]+)")
    return re.compile("".join(parts) + "/?"), (catch_alls, -literals, -len(parts))


def make_route(function: str, function_id: str, binding: dict[str, object], prefix: str) -> Route:
    template = str(binding.get("route") or function)
    pattern, rank = compile_route(template, prefix)
    raw_methods = binding.get("methods")
    methods = frozenset(str(m).upper() for m in raw_methods) if isinstance(raw_methods, list) and raw_methods else None
    return Route(function, function_id, str(binding.get("name", "req")), template, methods, pattern, rank)


def decoded_path(raw_path: str) -> str:
    """The path with each segment decoded, but an encoded slash stays ``%2F`` inside its segment (as in ASP.NET)."""
    return "/".join(unquote(s).replace("/", "%2F") for s in raw_path.split("?", maxsplit=1)[0].split("/"))


class RouteTable:
    """The routes, most specific first."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = sorted(routes, key=lambda r: r.rank)

    def match(self, path: str, method: str) -> tuple[Route, dict[str, str]] | bool:
        """The route and its parameters; else ``True`` when only the method differs, ``False`` for no route."""
        lowered = path.lower()
        path_matched = False
        for route in self.routes:
            found = route.pattern.fullmatch(lowered)
            if found is None:
                continue
            path_matched = True
            if route.methods is not None and method not in route.methods:
                continue
            # parameters keep the request's case: take them from the same span of the original path
            params = {k: path[found.start(k):found.end(k)] for k, v in found.groupdict().items() if v is not None}
            return route, params
        return path_matched
