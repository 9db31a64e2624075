{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "ballast-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "ballast-broker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ballast-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ballast-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ballast-broker.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ballast-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ballast
{{- end }}

{{- define "ballast-broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ballast-broker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ballast-broker.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "ballast-broker.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/* The headless Service: its name resolves to every ready replica. */}}
{{- define "ballast-broker.headlessName" -}}
{{- printf "%s-headless" (include "ballast-broker.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ballast-broker.pvcName" -}}
{{- default (printf "%s-data" (include "ballast-broker.fullname" .)) .Values.storage.sqlite.persistence.existingClaim }}
{{- end }}

{{/* Checks the values that have a closed set of choices; fails the render with the field name. */}}
{{- define "ballast-broker.validate" -}}
{{- if not (has .Values.serviceDiscoveryLoadBalancing (list "round-robin" "local-first-round-robin" "weighted-round-robin" "optimized")) }}
{{- fail (printf "serviceDiscoveryLoadBalancing: %q is not one of round-robin, local-first-round-robin, weighted-round-robin, optimized" .Values.serviceDiscoveryLoadBalancing) }}
{{- end }}
{{- if not (has .Values.optimizedLoadBalancingParams (list "cost" "performance" "mixed")) }}
{{- fail (printf "optimizedLoadBalancingParams: %q is not one of cost, performance, mixed" .Values.optimizedLoadBalancingParams) }}
{{- end }}
{{- if not (has .Values.egressPrices.table (list "builtin" "none")) }}
{{- fail (printf "egressPrices.table: %q is not one of builtin, none" .Values.egressPrices.table) }}
{{- end }}
{{- if not (has .Values.storage.type (list "sqlite" "postgres")) }}
{{- fail (printf "storage.type: %q is not one of sqlite, postgres" .Values.storage.type) }}
{{- end }}
{{- if and (eq .Values.storage.type "postgres") (not .Values.storage.postgres.existingSecret) }}
{{- fail "storage.postgres.existingSecret: required when storage.type is postgres (a Secret holding the database URL)" }}
{{- end }}
{{- if and (eq .Values.storage.type "sqlite") (gt (int .Values.replicaCount) 1) }}
{{- fail "replicaCount: must be 1 with storage.type sqlite (one SQLite file, one writer)" }}
{{- end }}
{{- if not (has .Values.ha.podAntiAffinity (list "preferred" "required" "none")) }}
{{- fail (printf "ha.podAntiAffinity: %q is not one of preferred, required, none" .Values.ha.podAntiAffinity) }}
{{- end }}
{{- with .Values.ha.podDisruptionBudget }}
{{- if and .minAvailable (ge (int .minAvailable) (int $.Values.replicaCount)) }}
{{- fail (printf "ha.podDisruptionBudget.minAvailable: %v must be below replicaCount %v (or no replica could ever be evicted)" .minAvailable $.Values.replicaCount) }}
{{- end }}
{{- if and (not .minAvailable) (lt (int .maxUnavailable) 1) }}
{{- fail (printf "ha.podDisruptionBudget.maxUnavailable: %v must be at least 1 (or no replica could ever be evicted)" .maxUnavailable) }}
{{- end }}
{{- end }}
{{- if and (not .Values.tls.existingSecret) (not .Values.tls.certManager.enabled) (not (and .Values.tls.cert .Values.tls.key .Values.tls.ca)) }}
{{- fail "tls: set tls.existingSecret, or tls.certManager.enabled with its issuerRef, or all of tls.cert, tls.key and tls.ca (PEM; make them with `ballast-broker certs`)" }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) }}
{{- fail "tls.certManager.issuerRef.name: required with tls.certManager.enabled (the Issuer or ClusterIssuer of the CA that also signs the agents' certificates)" }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.dnsNames) }}
{{- fail "tls.certManager.dnsNames: required with tls.certManager.enabled (the names agents use in broker.address)" }}
{{- end }}
{{- end }}

{{/*
The broker's command line: THE one place where values map to `ballast-broker serve` flags.
Paths below are where deployment.yaml mounts the TLS Secret and the SQLite volume.
*/}}
{{- define "ballast-broker.args" -}}
- serve
- --listen
- {{ printf "0.0.0.0:%d" (int .Values.grpc.port) | quote }}
{{- if gt (int .Values.replicaCount) 1 }}
- --replicas
- {{ .Values.replicaCount | int | toString | quote }}
- --replica-id
- "$(POD_NAME)"
{{- if .Values.ha.leaseTime }}
- --lease-time
- {{ .Values.ha.leaseTime | quote }}
{{- end }}
{{- end }}
{{- if eq .Values.storage.type "sqlite" }}
- --database
- {{ printf "sqlite://%s/%s?mode=rwc" .Values.storage.sqlite.mountPath .Values.storage.sqlite.file | quote }}
{{- end }}
{{- /* postgres: the URL (with its password) is read from BALLAST_DATABASE_URL, set from the
Secret in deployment.yaml, never passed as an argument (visible in /proc/PID/cmdline). */}}
- --ca
- /etc/ballast/tls/ca.crt
- --cert
- /etc/ballast/tls/tls.crt
- --key
- /etc/ballast/tls/tls.key
- --metrics-addr
- {{ printf "0.0.0.0:%d" (int .Values.metrics.port) | quote }}
- --policy
- {{ .Values.serviceDiscoveryLoadBalancing | quote }}
- --params
- {{ .Values.optimizedLoadBalancingParams | quote }}
- --solve-interval
- {{ .Values.solver.interval | quote }}
- --stale-after
- {{ .Values.solver.staleAfter | quote }}
- --cluster-expiry
- {{ .Values.solver.clusterExpiry | quote }}
- --tls-handshake-timeout
- {{ .Values.grpc.tlsHandshakeTimeout | quote }}
- --keepalive-interval
- {{ .Values.grpc.keepaliveInterval | quote }}
- --keepalive-timeout
- {{ .Values.grpc.keepaliveTimeout | quote }}
- --max-connections
- {{ .Values.grpc.maxConnections | int | toString | quote }}
- --max-connections-per-peer
- {{ .Values.grpc.maxConnectionsPerPeer | int | toString | quote }}
- --max-streams-per-connection
- {{ .Values.grpc.maxStreamsPerConnection | int | toString | quote }}
- --max-nodes-per-cluster
- {{ .Values.limits.maxNodesPerCluster | int | toString | quote }}
- --max-imports-per-cluster
- {{ .Values.limits.maxImportsPerCluster | int | toString | quote }}
- --max-services
- {{ .Values.limits.maxServices | int | toString | quote }}
- --max-step
- {{ .Values.solver.maxStep | quote }}
- --publish-threshold
- {{ .Values.solver.publishThreshold | quote }}
- --keep-generations
- {{ .Values.solver.keepGenerations | quote }}
- --egress-prices
{{- if .Values.egressPrices.operatorRows }}
- /etc/ballast/prices/egress_prices.csv
{{- else }}
- {{ .Values.egressPrices.table | quote }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* The image reference: repository@digest when image.digest is set, else repository:tag. */}}
{{- define "ballast-broker.image" -}}
{{- if .Values.image.digest -}}
{{ printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}
