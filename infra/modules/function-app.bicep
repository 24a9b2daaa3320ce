// The gateway's Function App: Flex Consumption, Python 3.13, the user-assigned identity for everything
// (storage, Service Bus, Key Vault references, Application Insights ingestion, AOAI backends without api_key).
param name string
param location string
param tags object
param planId string
param identityId string
param identityClientId string
param storageAccountName string
param deploymentContainer string
param serviceBusNamespace string
param queueName string
param appInsightsConnectionString string
param keyHashSecretUri string
param aoaiBackends string
param prices string
param ledgerRetentionDays int
param maximumInstanceCount int
param instanceMemoryMB int

var storageSuffix = environment().suffixes.storage

// Every setting the app reads in Azure (README, Settings); tests/test_infra.py loads them with the code's own
// load_settings. Flex Consumption sets the runtime in functionAppConfig, not FUNCTIONS_WORKER_RUNTIME.
var appSettings = {
  // the host's storage, by identity (shared keys are off)
  AzureWebJobsStorage__accountName: storageAccountName
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  // the gateway's tables
  UsageStorage__tableServiceUri: 'https://${storageAccountName}.table.${storageSuffix}'
  // content records, for keys that opt in (container contentlog, Storage Blob Data Contributor on it)
  CONTENT_LOG__blobServiceUri: 'https://${storageAccountName}.blob.${storageSuffix}'
  // usage events: the gateway's sender and the aggregate_usage trigger
  ServiceBusConnection__fullyQualifiedNamespace: '${serviceBusNamespace}.servicebus.windows.net'
  ServiceBusConnection__credential: 'managedidentity'
  ServiceBusConnection__clientId: identityClientId
  USAGE_QUEUE_NAME: queueName
  // DefaultAzureCredential in the app (tables, Service Bus, Entra ID tokens for AOAI) picks the user-assigned identity
  AZURE_CLIENT_ID: identityClientId
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
  AOAI_BACKENDS: aoaiBackends
  KEY_HASH_SECRET: '@Microsoft.KeyVault(SecretUri=${keyHashSecretUri})'
  LEDGER_RETENTION_DAYS: string(ledgerRetentionDays)
  // what usage costs (README, Prices and cost); empty: every request is counted unpriced
  PRICES: prices
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: planId
    httpsOnly: true
    keyVaultReferenceIdentity: identityId
    siteConfig: {
      minTlsVersion: '1.2'
      healthCheckPath: '/health/ready'
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainer}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: '3.13'
      }
    }
  }

  resource settings 'config' = {
    name: 'appsettings'
    properties: appSettings
  }
}

output name string = app.name
output url string = 'https://${app.properties.defaultHostName}'
