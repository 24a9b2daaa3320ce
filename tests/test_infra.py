"""azure.yaml and infra/ (Bicep), held against the code. The Bicep CLI cannot be installed here, so nothing compiles
the templates: two parsers from PyPI check their syntax, and the parsed templates are checked against what the code
reads, the names it uses and the built-in role ids."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import tree_sitter
import tree_sitter_bicep
import yaml
from pycep import BicepParser

from gateway import load_settings
from gateway._settings import load_service_bus
from tests.harness import PROJECT
from usage._config import DEFAULT_LEDGER_RETENTION_DAYS, load_storage_config
from usage._schema import REJECTS_TABLE, USAGE_TABLE
from usage._tables import KEYS_TABLE

INFRA = PROJECT / "infra"
TEMPLATES = sorted(INFRA.rglob("*.bicep"))
#: Azure's built-in role definitions (their ids are the same in every tenant)
BUILT_IN_ROLES = {
    "storageBlobDataOwner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",  # Storage Blob Data Owner
    "storageTableDataContributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",  # Storage Table Data Contributor
    "storageBlobDataContributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",  # Storage Blob Data Contributor
    "serviceBusDataSender": "69a216fc-b8fb-44d8-bc22-1f3c2cd27a39",  # Azure Service Bus Data Sender
    "serviceBusDataReceiver": "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0",  # Azure Service Bus Data Receiver
    "monitoringMetricsPublisher": "3913510d-42f4-4e42-8a64-420c390055eb",  # Monitoring Metrics Publisher
    "keyVaultSecretsUser": "4633458b-17de-408a-b874-0445c86b69e6",  # Key Vault Secrets User
}
COGNITIVE_SERVICES_OPENAI_USER = "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd"


def parsed(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = dict(BicepParser().parse(text=path.read_text()))
    return document


def errors(node: Any) -> list[str]:
    found = [f"{node.start_point}: {node.text[:60]!r}"] if node.type == "ERROR" or node.is_missing else []
    for child in node.children:
        found += errors(child)
    return found


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: str(p.relative_to(PROJECT)))
def test_templates_parse(path: Path) -> None:
    """Each template parses with tree-sitter-bicep without an error node, and with pycep-parser."""
    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_bicep.language()))
    tree = parser.parse(path.read_bytes())
    assert errors(tree.root_node) == []
    assert parsed(path)


def test_azd_project_and_parameters() -> None:
    """azure.yaml publishes this folder as a Python Function App from infra/main.bicep; the parameters file names
    only parameters main.bicep declares, and every required one without a default."""
    project = yaml.safe_load((PROJECT / "azure.yaml").read_text())
    assert project["infra"] == {"provider": "bicep", "path": "infra", "module": "main"}
    [service] = project["services"].values()
    assert (service["project"], service["language"], service["host"]) == (".", "python", "function")
    declared = parsed(INFRA / "main.bicep")["parameters"]
    given = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert set(given) <= set(declared)
    assert {name for name, p in declared.items() if "default" not in p} <= set(given)
    assert declared["ledgerRetentionDays"]["default"] == DEFAULT_LEDGER_RETENTION_DAYS


def _render(value: Any, names: dict[str, str]) -> str:
    """An app setting's value with parameters replaced by plausible values (``${x}`` and bare ``x``)."""
    if isinstance(value, dict):  # a function call, e.g. string(ledgerRetentionDays)
        [(kind, call)] = value.items()
        assert kind == "function" and call["type"] == "string"
        return names[call["parameters"]["value_to_convert"]]
    text = str(value)
    if text in names:
        return names[text]
    return re.sub(r"\$\{(\w+)\}", lambda m: names[m.group(1)], text)


def app_settings() -> dict[str, str]:
    app = parsed(INFRA / "modules/function-app.bicep")
    resources = parsed(INFRA / "resources.bicep")
    names = {
        "storageAccountName": "stexample", "storageSuffix": "core.windows.net", "serviceBusNamespace": "sb-example",
        "identityClientId": "11111111-2222-3333-4444-555555555555",
        "appInsightsConnectionString": "InstrumentationKey=x",
        "queueName": resources["variables"]["queueName"]["value"], "ledgerRetentionDays": "14",
        "aoaiBackends": json.dumps([{"name": "east", "endpoint": "https://east.openai.azure.com"}]),
        "prices": json.dumps({"gpt-4o": {"currency": "USD", "input": 2.5, "cached_input": 1.25, "output": 10}}),
        "keyHashSecretUri": "https://kv-example.vault.azure.net/secrets/key-hash-secret",
    }
    return {name: _render(value, names) for name, value in app["variables"]["appSettings"]["value"].items()}


def test_every_setting_the_app_needs_in_azure_is_set() -> None:
    """The code's own loaders accept the app settings; they are identity-based; the bindings' settings resolve."""
    env = app_settings()
    settings = load_settings(env)  # raises, naming the setting, if one is missing or malformed
    assert settings.storage.uses_identity and settings.storage.table_service_uri == (
        "https://stexample.table.core.windows.net")
    assert settings.service_bus is not None and settings.service_bus.fully_qualified_namespace == (
        "sb-example.servicebus.windows.net")
    assert settings.needs_credential and env["AZURE_CLIENT_ID"]  # DefaultAzureCredential: the user-assigned identity
    assert load_storage_config(env).table_service_uri == settings.storage.table_service_uri
    # the host's own storage, with shared keys off, and the Service Bus trigger's connection, by identity
    for connection in ("AzureWebJobsStorage", "ServiceBusConnection"):
        assert env[f"{connection}__credential"] == "managedidentity" and env[f"{connection}__clientId"]
    assert env["AzureWebJobsStorage__accountName"]
    source = (PROJECT / "function_app.py").read_text()
    for setting in re.findall(r'queue_name="%(\w+)%"', source):
        assert env[setting]
    for connection in re.findall(r'connection="(\w+)"', source):
        assert f"{connection}__fullyQualifiedNamespace" in env
    assert env["KEY_HASH_SECRET"].startswith("@Microsoft.KeyVault(SecretUri=https://")
    assert env["APPLICATIONINSIGHTS_CONNECTION_STRING"] and "Authorization=AAD" in env[
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING"]
    assert float(env["LEDGER_RETENTION_DAYS"]) == settings.ledger_retention_days
    assert settings.prices.currency("gpt-4o") == "USD"
    assert settings.content_log is not None and settings.content_log.blob_service_uri == (
        "https://stexample.blob.core.windows.net")
    # Flex Consumption refuses these two: the runtime is set in functionAppConfig
    assert not {"FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION"} & set(env)


def test_python_313_on_flex_consumption_with_a_user_assigned_identity() -> None:
    app = parsed(INFRA / "modules/function-app.bicep")["resources"]["app"]["config"]
    assert app["kind"] == "functionapp,linux" and app["identity"]["type"] == "UserAssigned"
    properties = app["properties"]
    assert properties["functionAppConfig"]["runtime"] == {"name": "python", "version": "3.13"}
    assert properties["keyVaultReferenceIdentity"] == "identityId"
    assert properties["functionAppConfig"]["deployment"]["storage"]["authentication"]["type"] == "UserAssignedIdentity"
    assert properties["siteConfig"]["healthCheckPath"] == "/health/ready"
    plan = parsed(INFRA / "resources.bicep")["modules"]["plan"]["config"]["params"]
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"} and plan["reserved"] is True


def test_queue_tables_and_storage_are_as_the_code_expects() -> None:
    resources = parsed(INFRA / "resources.bicep")
    queue_name = resources["variables"]["queueName"]["value"]
    assert queue_name == load_service_bus({"ServiceBusConnection__fullyQualifiedNamespace": "x.y"}).queue  # type: ignore[union-attr]
    sample = json.loads((PROJECT / "local.settings.sample.json").read_text())["Values"]
    assert queue_name == sample["USAGE_QUEUE_NAME"]
    bus = resources["modules"]["serviceBus"]["config"]["params"]
    assert bus["skuObject"] == {"name": "Standard"}
    [queue] = bus["queues"]
    assert queue["name"] == "queueName" and queue["requiresDuplicateDetection"] is True
    assert queue["maxDeliveryCount"] == 10
    minutes = re.fullmatch(r"PT(\d+)M", queue["lockDuration"])
    assert minutes is not None and int(minutes.group(1)) >= 1
    assert queue["defaultMessageTimeToLive"] == "P${ledgerRetentionDays}D"  # no delivery past the ledger's horizon
    assert set(resources["variables"]["tableNames"]["value"]) == {KEYS_TABLE, USAGE_TABLE, REJECTS_TABLE}
    storage = resources["modules"]["storage"]["config"]["params"]
    assert storage["allowSharedKeyAccess"] is False
    assert storage["blobServices"]["containers"][0]["name"] == "deploymentContainer"


def _roles_named(tree: Any) -> set[str]:
    """Names of ``roles.<name>`` referenced anywhere in ``tree``."""
    found: set[str] = set()
    if isinstance(tree, dict):
        operands = tree.get("operator", {}).get("operands") if isinstance(tree.get("operator"), dict) else None
        if isinstance(operands, dict) and operands.get("operand_1") == "roles":
            found.add(str(operands["operand_2"]))
        for value in tree.values():
            found |= _roles_named(value)
    elif isinstance(tree, list):
        for value in tree:
            found |= _roles_named(value)
    return found


def test_role_assignments_use_the_built_in_role_ids() -> None:
    """Each role the identity needs is assigned on what it uses, by the built-in role's id."""
    resources = parsed(INFRA / "resources.bicep")
    assert resources["variables"]["roles"]["value"] == BUILT_IN_ROLES
    modules = resources["modules"]
    assert _roles_named(modules["storage"]) == {"storageBlobDataOwner", "storageTableDataContributor",
                                                "storageBlobDataContributor"}
    assert _roles_named(modules["serviceBus"]) == {"serviceBusDataSender", "serviceBusDataReceiver"}
    assert _roles_named(modules["appInsights"]) == {"monitoringMetricsPublisher"}
    assert _roles_named(resources["resources"]["secretsUser"]) == {"keyVaultSecretsUser"}
    access = parsed(INFRA / "modules/openai-access.bicep")
    assert access["variables"]["cognitiveServicesOpenAiUser"]["value"] == COGNITIVE_SERVICES_OPENAI_USER
    assert access["resources"]["account"]["type"] == "Microsoft.CognitiveServices/accounts"
    main = parsed(INFRA / "main.bicep")
    assert main["modules"]["openAiAccess"]["detail"]["path"] == "modules/openai-access.bicep"
    guids = set(re.findall(r"'([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})'",
                           "\n".join(p.read_text() for p in TEMPLATES)))
    assert guids == {*BUILT_IN_ROLES.values(), COGNITIVE_SERVICES_OPENAI_USER}


def test_content_log_container_its_expiry_and_its_role() -> None:
    """The content-log container the code writes to exists, a lifecycle rule expires it (30 days by default),
    and the app's identity is Storage Blob Data Contributor on it."""
    from usage._content import CONTAINER

    resources = parsed(INFRA / "resources.bicep")
    assert resources["variables"]["contentLogContainer"]["value"] == CONTAINER
    storage = resources["modules"]["storage"]["config"]["params"]
    [container] = [c for c in storage["blobServices"]["containers"] if c["name"] == "contentLogContainer"]
    assert container["publicAccess"] == "None"
    assert _roles_named(container["roleAssignments"]) == {"storageBlobDataContributor"}
    [rule] = storage["managementPolicyRules"]
    assert rule["enabled"] is True and rule["type"] == "Lifecycle"
    assert rule["definition"]["actions"]["baseBlob"]["delete"] == {
        "daysAfterModificationGreaterThan": "contentLogRetentionDays"}
    assert rule["definition"]["filters"]["prefixMatch"] == ["${contentLogContainer}/"]
    main = parsed(INFRA / "main.bicep")
    assert main["parameters"]["contentLogRetentionDays"]["default"] == 30
