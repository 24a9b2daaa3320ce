"""A streaming Azure OpenAI gateway for Azure Functions: failover, exact usage, quotas."""

from gateway._exceptions import (
    BadRequest,
    GatewayError,
    KeyStoreUnavailable,
    MethodNotAllowed,
    NoBackendAvailable,
    NotFound,
    PayloadTooLarge,
    RequestError,
    RequestTimedOut,
    SettingsError,
    Unauthorized,
    UpstreamFailed,
    UpstreamTimedOut,
)
from gateway._functions import (
    check_health,
    check_ready,
    list_models,
    not_routed,
    proxy_request,
    stored_response_request,
)
from gateway._records import LoggingSink, Usage, UsageRecord, UsageSink
from gateway._runtime import GatewayRuntime
from gateway._settings import BackendConfig, Settings, load_settings
from gateway._telemetry import setup_telemetry
from gateway._usage_page import UsagePage

__all__ = [
    "BackendConfig",
    "BadRequest",
    "GatewayError",
    "GatewayRuntime",
    "KeyStoreUnavailable",
    "LoggingSink",
    "MethodNotAllowed",
    "NoBackendAvailable",
    "NotFound",
    "PayloadTooLarge",
    "RequestError",
    "RequestTimedOut",
    "Settings",
    "SettingsError",
    "Unauthorized",
    "UpstreamFailed",
    "UpstreamTimedOut",
    "Usage",
    "UsagePage",
    "UsageRecord",
    "UsageSink",
    "check_health",
    "check_ready",
    "list_models",
    "load_settings",
    "not_routed",
    "proxy_request",
    "setup_telemetry",
    "stored_response_request",
]
