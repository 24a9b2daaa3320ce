// The whole gateway in one resource group: `azd up` (azure.yaml) provisions this, then publishes the app.
// Not compiled or deployed from the project's machines (no Bicep CLI there): tests/test_infra.py parses it
// and holds it against the code instead.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('azd environment name: names the resource group and seeds the resources\' names')
param environmentName string

@minLength(1)
@description('Region of every resource (one where Flex Consumption runs Python 3.13)')
@metadata({ azd: { type: 'location' } })
param location string

@description('AOAI_BACKENDS: the JSON array of backends (README, Settings). Backends without api_key use the app\'s identity')
param aoaiBackends string

@description('PRICES: each deployment\'s prices per million tokens, JSON (README, Prices and cost). Empty: usage is counted unpriced')
param prices string = ''

@description('JSON array of the existing AOAI resources the identity may call: [{"name", "resourceGroup", "subscriptionId"?}]')
param openAiResources string = '[]'

@secure()
@minLength(16)
@description('KEY_HASH_SECRET, kept in Key Vault. Changing it later: see the README runbook (KEY_HASH_SECRET_PREVIOUS)')
param keyHashSecret string

@description('Object id of the operator who runs `python -m usage` (keys, reports): given table access. Empty: nobody')
param principalId string = ''

@description('LEDGER_RETENTION_DAYS, and the queue\'s message time-to-live: the redelivery horizon')
@minValue(1)
param ledgerRetentionDays int = 14

@description('How long content records (CONTENT_LOG, for keys that opt in) are kept before the lifecycle rule deletes them')
@minValue(1)
param contentLogRetentionDays int = 30

@description('Flex Consumption: most instances, and memory per instance')
param maximumInstanceCount int = 40
param instanceMemoryMB int = 2048

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = { 'azd-env-name': environmentName }

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module gateway 'resources.bicep' = {
  name: 'gateway-resources'
  scope: rg
  params: {
    location: location
    tags: tags
    resourceToken: resourceToken
    aoaiBackends: aoaiBackends
    prices: prices
    keyHashSecret: keyHashSecret
    principalId: principalId
    ledgerRetentionDays: ledgerRetentionDays
    contentLogRetentionDays: contentLogRetentionDays
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
  }
}

// Cognitive Services OpenAI User on each existing AOAI resource, wherever it lives
module openAiAccess 'modules/openai-access.bicep' = [for resource in json(openAiResources): {
  name: 'openai-user-${uniqueString(resource.name, resource.resourceGroup)}'
  scope: resourceGroup(resource.?subscriptionId ?? subscription().subscriptionId, resource.resourceGroup)
  params: {
    accountName: resource.name
    principalId: gateway.outputs.identityPrincipalId
  }
}]

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = gateway.outputs.functionAppName
output GATEWAY_URL string = gateway.outputs.url
output UsageStorage__tableServiceUri string = gateway.outputs.tableServiceUri
