{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "ballast-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "ballast-agent.fullname" -}}
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

{{- define "ballast-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ballast-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ballast-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ballast-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ballast
ballast.io/cluster-id: {{ .Values.clusterId | quote }}
{{- end }}

{{- define "ballast-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ballast-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ballast-agent.tlsSecretName" -}}
{{- default (printf "%s-client-tls" (include "ballast-agent.fullname" .)) .Values.broker.tls.existingSecret }}
{{- end }}

{{/* Checks the required values; fails the render with the field name. */}}
{{- define "ballast-agent.validate" -}}
{{- if not .Values.clusterId }}
{{- fail "clusterId: required (this cluster's id, as named in its client certificate)" }}
{{- end }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" .Values.clusterId) }}
{{- fail (printf "clusterId: %q is not a DNS label ([a-z0-9-], alphanumeric at both ends)" .Values.clusterId) }}
{{- end }}
{{- if not (include "ballast-agent.brokerAddresses" .) }}
{{- fail "broker.address: required (the broker's gRPC URL, e.g. https://broker.example.com:50051, or a list of them), or set broker.inCluster.enabled" }}
{{- end }}
{{- range (include "ballast-agent.brokerAddresses" . | splitList ",") }}
{{- if not (regexMatch `^https://[^/,\s]+(/.*)?$` .) }}
{{- fail (printf "broker.address: %q is not https://host:port (mutual TLS)" .) }}
{{- end }}
{{- end }}
{{- if not (has .Values.discovery (list "kubernetes")) }}
{{- fail (printf "discovery: %q is not supported in a cluster (use kubernetes)" .Values.discovery) }}
{{- end }}
{{- if and (not .Values.broker.tls.existingSecret) (not .Values.broker.tls.certManager.enabled) (not (and .Values.broker.tls.cert .Values.broker.tls.key .Values.broker.tls.ca)) }}
{{- fail "broker.tls: set broker.tls.existingSecret, or broker.tls.certManager.enabled with its issuerRef, or all of broker.tls.cert, broker.tls.key and broker.tls.ca (PEM; make them with `ballast-broker certs`)" }}
{{- end }}
{{- if and .Values.broker.tls.certManager.enabled (not .Values.broker.tls.certManager.issuerRef.name) }}
{{- fail "broker.tls.certManager.issuerRef.name: required with broker.tls.certManager.enabled (the cert-manager Issuer or ClusterIssuer of the broker's CA)" }}
{{- end }}
{{- if not (has .Values.metrics.bind (list "node" "localhost" "all")) }}
{{- fail (printf "metrics.bind: %q is not one of node (the node's IP), localhost (127.0.0.1), all (0.0.0.0)" .Values.metrics.bind) }}
{{- end }}
{{- if and .Values.priorityClassName (not (regexMatch "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$" .Values.priorityClassName)) }}
{{- fail (printf "priorityClassName: %q is not a valid object name" .Values.priorityClassName) }}
{{- end }}
{{- if and .Values.priorityClassName (not (hasPrefix "system-" .Values.priorityClassName)) }}
{{- /* lookup answers only against a live cluster (helm install/upgrade); offline renders skip this. */}}
{{- $live := lookup "v1" "Namespace" "" "kube-system" }}
{{- if and $live (not (lookup "scheduling.k8s.io/v1" "PriorityClass" "" .Values.priorityClassName)) }}
{{- fail (printf "priorityClassName: PriorityClass %q does not exist in this cluster" .Values.priorityClassName) }}
{{- end }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (eq .Values.metrics.bind "localhost") }}
{{- fail "metrics.bind: localhost cannot be scraped by the ServiceMonitor (metrics.serviceMonitor.enabled); use node" }}
{{- end }}
{{- if not (has .Values.detachOnExit (list "auto" "always" "never")) }}
{{- fail (printf "detachOnExit: %q is not one of auto, always, never" .Values.detachOnExit) }}
{{- end }}
{{- range .Values.capabilities.extra }}
{{- if not (regexMatch "^[A-Z_]+$" .) }}
{{- fail (printf "capabilities.extra: %q is not a capability name without CAP_ (e.g. SYS_PTRACE)" .) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The broker addresses, comma-separated (the form --broker takes): broker.address as a list
or one URL, else with broker.inCluster.enabled the broker chart's headless Service.
*/}}
{{- define "ballast-agent.brokerAddresses" -}}
{{- $a := .Values.broker.address }}
{{- if kindIs "slice" $a }}
{{- $out := list }}
{{- range $a }}{{ $out = append $out (toString . | trim) }}{{ end }}
{{- join "," $out }}
{{- else if $a }}
{{- toString $a | trim }}
{{- else if .Values.broker.inCluster.enabled }}
{{- with .Values.broker.inCluster }}
{{- printf "https://%s-headless.%s.svc:%d" .service (default $.Release.Namespace .namespace) (int .port) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The metrics listen address per metrics.bind (NODE_IP comes from the downward API). */}}
{{- define "ballast-agent.metricsAddr" -}}
{{- if eq .Values.metrics.bind "localhost" -}}
{{ printf "127.0.0.1:%d" (int .Values.metrics.port) }}
{{- else if eq .Values.metrics.bind "all" -}}
{{ printf "0.0.0.0:%d" (int .Values.metrics.port) }}
{{- else -}}
{{ printf "$(NODE_IP):%d" (int .Values.metrics.port) }}
{{- end }}
{{- end }}

{{/*
The agent's command line: THE one place where values map to `ballast-agent` flags.
Paths below are where daemonset.yaml mounts the client-certificate Secret and the host's
cgroup v2 root; NODE_NAME comes from the downward API.
*/}}
{{- define "ballast-agent.args" -}}
- --cluster-id
- {{ .Values.clusterId | quote }}
- --broker
- {{ include "ballast-agent.brokerAddresses" . | quote }}
- --ca
- /etc/ballast/tls/ca.crt
- --cert
- /etc/ballast/tls/tls.crt
- --key
- /etc/ballast/tls/tls.key
- --discovery
- {{ .Values.discovery | quote }}
- --cgroup
- /run/ballast/cgroup
- --pin-dir
- {{ .Values.bpf.pinDir | quote }}
- --metrics-addr
- {{ include "ballast-agent.metricsAddr" . | quote }}
- --node-name
- "$(NODE_NAME)"
{{- range $flag, $value := dict "region" .Values.region "zone" .Values.zone "provider" .Values.provider "gateway" .Values.gateway }}
{{- if $value }}
- {{ printf "--%s" $flag }}
- {{ $value | quote }}
{{- end }}
{{- end }}
{{- if .Values.peers }}
- --config
- /etc/ballast/config/agent.yaml
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* The image reference: repository@digest when image.digest is set, else repository:tag. */}}
{{- define "ballast-agent.image" -}}
{{- if .Values.image.digest -}}
{{ printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}
