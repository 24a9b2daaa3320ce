// Everything the gateway runs on, in one resource group. Azure Verified Modules (br/public:avm/...) where they fit;
// the Flex Consumption app and the Key Vault are plain resources (their settings are the point here).
param location string
param tags object
param resourceToken string
param aoaiBackends string
param prices string
@secure()
param keyHashSecret string
param principalId string
param ledgerRetentionDays int
param contentLogRetentionDays int
param maximumInstanceCount int
param instanceMemoryMB int

// Names the code uses: the queue (USAGE_QUEUE_NAME, gateway/_settings.py) and the tables (usage/_tables.py,
// usage/_schema.py). The tables are made here so nothing needs to create them at run time.
var queueName = 'usage-events'
var tableNames = ['gatewaykeys', 'usage', 'usagerejects']
var deploymentContainer = 'app-package-${take(resourceToken, 12)}'
// content records (CONTENT_LOG, usage/_content.py), expired by a lifecycle rule after contentLogRetentionDays
var contentLogContainer = 'contentlog'
var keyHashSecretName = 'key-hash-secret'

// Built-in role definition ids
var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  serviceBusDataSender: '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39'
  serviceBusDataReceiver: '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
}

module identity 'br/public:avm/res/managed-identity/user-assigned-identity:0.4.1' = {
  name: 'identity'
  params: {
    name: 'id-gateway-${resourceToken}'
    location: location
    tags: tags
  }
}

module logAnalytics 'br/public:avm/res/operational-insights/workspace:0.11.1' = {
  name: 'log-analytics'
  params: {
    name: 'log-${resourceToken}'
    location: location
    tags: tags
    dataRetention: 30
  }
}

module appInsights 'br/public:avm/res/insights/component:0.6.0' = {
  name: 'app-insights'
  params: {
    name: 'appi-${resourceToken}'
    location: location
    tags: tags
    workspaceResourceId: logAnalytics.outputs.resourceId
    disableLocalAuth: true // ingestion with Entra ID: APPLICATIONINSIGHTS_AUTHENTICATION_STRING below
    roleAssignments: [
      {
        principalId: identity.outputs.principalId
        principalType: 'ServicePrincipal'
        roleDefinitionIdOrName: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
      }
    ]
  }
}

module storage 'br/public:avm/res/storage/storage-account:0.8.3' = {
  name: 'storage'
  params: {
    name: 'st${take(resourceToken, 20)}'
    location: location
    tags: tags
    skuName: 'Standard_LRS'
    allowSharedKeyAccess: false // identity only: hence AzureWebJobsStorage__* and UsageStorage__tableServiceUri
    allowBlobPublicAccess: false
    minimumTlsVersion: 'TLS1_2'
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    blobServices: {
      containers: [
        {
          name: deploymentContainer
          publicAccess: 'None'
        }
        {
          name: contentLogContainer
          publicAccess: 'None'
          roleAssignments: [
            {
              principalId: identity.outputs.principalId
              principalType: 'ServicePrincipal'
              roleDefinitionIdOrName: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
            }
          ]
        }
      ]
    }
    managementPolicyRules: [
      {
        enabled: true
        name: 'contentlog-expiry'
        type: 'Lifecycle'
        definition: {
          actions: {
            baseBlob: {
              delete: {
                daysAfterModificationGreaterThan: contentLogRetentionDays
              }
            }
          }
          filters: {
            blobTypes: [
              'blockBlob'
            ]
            prefixMatch: [
              '${contentLogContainer}/'
            ]
          }
        }
      }
    ]
    tableServices: {
      tables: [for table in tableNames: { name: table }]
    }
    roleAssignments: concat([
      {
        principalId: identity.outputs.principalId
        principalType: 'ServicePrincipal'
        roleDefinitionIdOrName: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
      }
      {
        principalId: identity.outputs.principalId
        principalType: 'ServicePrincipal'
        roleDefinitionIdOrName: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
      }
    ], empty(principalId) ? [] : [
      {
        principalId: principalId
        principalType: 'User'
        roleDefinitionIdOrName: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
      }
    ])
  }
}

module serviceBus 'br/public:avm/res/service-bus/namespace:0.9.0' = {
  name: 'service-bus'
  params: {
    name: 'sb-${resourceToken}'
    location: location
    tags: tags
    skuObject: {
      name: 'Standard'
    }
    disableLocalAuth: true
    queues: [
      {
        name: queueName
        requiresDuplicateDetection: true
        duplicateDetectionHistoryTimeWindow: 'PT10M'
        maxDeliveryCount: 10
        lockDuration: 'PT1M'
        // no message older than the ledger's horizon is ever delivered (LEDGER_RETENTION_DAYS)
        defaultMessageTimeToLive: 'P${ledgerRetentionDays}D'
        deadLetteringOnMessageExpiration: true
      }
    ]
    roleAssignments: [
      {
        principalId: identity.outputs.principalId
        principalType: 'ServicePrincipal'
        roleDefinitionIdOrName: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataSender)
      }
      {
        principalId: identity.outputs.principalId
        principalType: 'ServicePrincipal'
        roleDefinitionIdOrName: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataReceiver)
      }
    ]
  }
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: 'kv-${take(resourceToken, 20)}'
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
  }
}

resource keyHash 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: keyHashSecretName
  properties: {
    value: keyHashSecret
  }
}

resource secretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, 'gateway', roles.keyVaultSecretsUser)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
    principalId: identity.outputs.principalId
    principalType: 'ServicePrincipal'
  }
}

module plan 'br/public:avm/res/web/serverfarm:0.1.1' = {
  name: 'plan'
  params: {
    name: 'plan-${resourceToken}'
    location: location
    tags: tags
    sku: {
      name: 'FC1'
      tier: 'FlexConsumption'
    }
    reserved: true
  }
}

module app 'modules/function-app.bicep' = {
  name: 'function-app'
  dependsOn: [secretsUser, storage, serviceBus]
  params: {
    name: 'func-${resourceToken}'
    location: location
    tags: union(tags, { 'azd-service-name': 'gateway' })
    planId: plan.outputs.resourceId
    identityId: identity.outputs.resourceId
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainer: deploymentContainer
    serviceBusNamespace: serviceBus.outputs.name
    queueName: queueName
    appInsightsConnectionString: appInsights.outputs.connectionString
    keyHashSecretUri: '${vault.properties.vaultUri}secrets/${keyHashSecretName}'
    aoaiBackends: aoaiBackends
    prices: prices
    ledgerRetentionDays: ledgerRetentionDays
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
  }
}

output identityPrincipalId string = identity.outputs.principalId
output functionAppName string = app.outputs.name
output url string = app.outputs.url
output tableServiceUri string = 'https://${storage.outputs.name}.table.${environment().suffixes.storage}'
