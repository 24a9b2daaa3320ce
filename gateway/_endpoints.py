"""The kinds of call the gateway serves: what each is named in usage events and where it goes upstream.

Three path styles reach a backend: ``/openai/deployments/{deployment}/<path>`` (the deployment in the
path), ``/openai/v1/<path>`` and, for the Responses API, ``/openai/<path>`` (the deployment in the
body's ``model`` or the multipart form field ``model``). Calls on a stored response name no
deployment at all: they go where the response lives (see ``_affinity``).
"""

from __future__ import annotations

from dataclasses import dataclass

#: The Responses API's calls on a stored response: operation -> (method, path under the API's root).
STORED_ACTIONS = {
    "responses.retrieve": ("GET", "responses/{id}"),
    "responses.delete": ("DELETE", "responses/{id}"),
    "responses.cancel": ("POST", "responses/{id}/cancel"),
    "responses.input_items": ("GET", "responses/{id}/input_items"),
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One kind of call: its usage ``operation``, upstream method and path, and where its deployment is named."""

    operation: str
    path: str  # below /openai/deployments/{d}/, /openai/v1/ or /openai/; "{id}" for a stored response's id
    v1: bool
    method: str = "POST"
    deployment_in_path: bool = False
    form: bool = False  # the body may be multipart/form-data (audio files)
    stored: bool = False  # a call on a stored response, by its id

    @property
    def estimated(self) -> bool:
        """Whether usage the backend did not report is estimated (text APIs) rather than left at none."""
        return self.operation in ("chat/completions", "completions", "embeddings", "responses")

    @property
    def stream_options(self) -> bool:
        """Whether streams of this kind report usage only when asked with ``stream_options``."""
        return self.operation in ("chat/completions", "completions")


#: POST calls naming a deployment: operation -> path below the deployment (classic) or /openai/v1/.
_DEPLOYMENT_CALLS = {
    "chat/completions": "chat/completions",
    "completions": "completions",
    "embeddings": "embeddings",
    "images": "images/generations",
    "audio.transcriptions": "audio/transcriptions",
    "audio.translations": "audio/translations",
    "audio.speech": "audio/speech",
}
_FORMS = frozenset({"audio.transcriptions", "audio.translations"})


def endpoint(operation: str, *, v1: bool) -> Endpoint:
    """The endpoint of a call; ``KeyError`` for an operation the gateway does not serve."""
    if operation == "responses":
        return Endpoint("responses", "responses", v1=v1)
    if operation in STORED_ACTIONS:
        method, path = STORED_ACTIONS[operation]
        return Endpoint(operation, path, v1=v1, method=method, stored=True)
    return Endpoint(operation, _DEPLOYMENT_CALLS[operation], v1=v1, deployment_in_path=not v1,
                    form=operation in _FORMS)
