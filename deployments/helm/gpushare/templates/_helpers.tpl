{{/* Chart name, shortened to fit Kubernetes names. */}}
{{- define "gpushare.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of the release's objects. */}}
{{- define "gpushare.fullname" -}}
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

{{- define "gpushare.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpushare.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gpushare.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "gpushare.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The ConfigMap that holds config.yaml: the chart's own, or an existing one. */}}
{{- define "gpushare.configMapName" -}}
{{- if .Values.config.existingConfigMap }}
{{- .Values.config.existingConfigMap }}
{{- else }}
{{- printf "%s-config" (include "gpushare.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The config file's path in the container: the ConfigMap is mounted at /etc/gpushare. */}}
{{- define "gpushare.configPath" -}}
{{- if .Values.config.existingConfigMap }}
{{- printf "/etc/gpushare/%s" .Values.config.existingConfigMapKey }}
{{- else }}
{{- print "/etc/gpushare/config.yaml" }}
{{- end }}
{{- end }}

{{/* A file of the chart's ConfigMap: a map is written as YAML, a string as it is. */}}
{{- define "gpushare.fileText" -}}
{{- if kindIs "string" . }}
{{- . }}
{{- else }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* Privileged only where gpushare needs it: MPS (compute mode) and MIG reconfiguration. */}}
{{- define "gpushare.privileged" -}}
{{- if or .Values.mps.enabled .Values.migReconfiguration.enabled }}true{{ end }}
{{- end }}

{{/* Values that contradict each other fail here, with the value to change. */}}
{{- define "gpushare.checks" -}}
{{- if and (eq .Values.probes.mode "http") (not .Values.metrics.enabled) }}
{{- fail "probes.mode=http probes the metrics port: set metrics.enabled=true, or probes.mode=exec" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled=true" }}
{{- end }}
{{- if and (not .Values.config.existingConfigMap) (kindIs "map" .Values.config.content) }}
{{- $sharing := get .Values.config.content "sharing" | default dict }}
{{- if and (kindIs "map" $sharing) (hasKey $sharing "mps") (not .Values.mps.enabled) }}
{{- fail "config.content shares GPUs with MPS (sharing.mps): set mps.enabled=true for hostPID, the mps.root mount and the privileges the MPS daemons need" }}
{{- end }}
{{- $plugin := dig "flags" "plugin" dict .Values.config.content }}
{{- $strategies := get $plugin "deviceListStrategy" | default list }}
{{- if kindIs "string" $strategies }}{{ $strategies = list $strategies }}{{ end }}
{{- if and (or (has "cdi-annotations" $strategies) (has "cdi-cri" $strategies)) (not .Values.cdi.enabled) }}
{{- fail "config.content hands devices out by CDI (flags.plugin.deviceListStrategy): set cdi.enabled=true so the CDI spec directory is the host's" }}
{{- end }}
{{- if and (hasKey .Values.config.content "migReconfiguration") (not .Values.migReconfiguration.enabled) }}
{{- fail "config.content has a migReconfiguration section: set migReconfiguration.enabled=true so the daemon may change MIG layouts" }}
{{- end }}
{{- end }}
{{- if hasKey .Values.config.extraFiles "config.yaml" }}
{{- fail "config.extraFiles: config.yaml is the config file itself; put it in config.content" }}
{{- end }}
{{- end }}
