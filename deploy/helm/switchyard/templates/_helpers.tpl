{{/* Names ------------------------------------------------------------------------ */}}

{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every resource name. */}}
{{- define "switchyard.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "switchyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "switchyard.routerName" -}}
{{- printf "%s-router" (include "switchyard.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "switchyard.routerServiceAccount" -}}
{{- if .Values.routerSpec.serviceAccount.create -}}
{{- default (include "switchyard.routerName" .) .Values.routerSpec.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.routerSpec.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An engine's resource name. Call with (dict "root" $ "model" $modelSpec). */}}
{{- define "switchyard.engineName" -}}
{{- printf "%s-%s-engine" (include "switchyard.fullname" .root) .model.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The name clients send for a model (and the engine's --served-model-name). */}}
{{- define "switchyard.servedModelName" -}}
{{- default .name .servedModelName -}}
{{- end -}}

{{/* Labels ----------------------------------------------------------------------- */}}

{{- define "switchyard.commonLabels" -}}
helm.sh/chart: {{ include "switchyard.chart" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: switchyard
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
{{- end -}}

{{- define "switchyard.routerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: router
{{- end -}}

{{- define "switchyard.routerLabels" -}}
{{ include "switchyard.routerSelectorLabels" . }}
{{ include "switchyard.commonLabels" . }}
{{- range $k, $v := .Values.routerSpec.labels }}
{{ $k }}: {{ $v | quote }}
{{- end }}
{{- end -}}

{{/* The labels every engine pod and Service carries, whatever its model: the router's
     --k8s-label-selector is exactly these. */}}
{{- define "switchyard.engineDiscoveryLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: engine
{{- range $k, $v := .Values.servingEngineSpec.labels }}
{{ $k }}: {{ $v | quote }}
{{- end }}
{{- end -}}

{{/* The router's --k8s-label-selector: key=value pairs of the discovery labels. */}}
{{- define "switchyard.engineLabelSelector" -}}
{{- $labels := include "switchyard.engineDiscoveryLabels" . | fromYaml -}}
{{- $pairs := list -}}
{{- range $k := keys $labels | sortAlpha -}}
{{- $pairs = append $pairs (printf "%s=%s" $k (get $labels $k)) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/* Selector of one model's pods. Call with (dict "root" $ "model" $modelSpec). */}}
{{- define "switchyard.engineSelectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: engine
model: {{ .model.name }}
{{- end -}}

{{/* Labels of one model's objects and pods. Call with (dict "root" $ "model" $modelSpec). */}}
{{- define "switchyard.engineLabels" -}}
{{ include "switchyard.engineDiscoveryLabels" .root }}
model: {{ .model.name }}
{{ include "switchyard.commonLabels" .root }}
{{- end -}}

{{/* Images ----------------------------------------------------------------------- */}}

{{- define "switchyard.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* An engine's image. Call with (dict "root" $ "model" $modelSpec). */}}
{{- define "switchyard.engineImage" -}}
{{- if eq (default "vllm" .model.engine) "vllm" -}}
{{- printf "%s:%s" (default "vllm/vllm-openai" .model.repository) (default "latest" .model.tag) -}}
{{- else -}}
{{- printf "%s:%s" (default .root.Values.image.repository .model.repository) (default (default .root.Chart.AppVersion .root.Values.image.tag) .model.tag) -}}
{{- end -}}
{{- end -}}

{{/* A probe from values: port filled in with the named container port. */}}
{{- define "switchyard.probe" -}}
{{- $probe := deepCopy .probe -}}
{{- $http := merge (dict "port" "http") (default (dict) $probe.httpGet) -}}
{{- $_ := set $probe "httpGet" $http -}}
{{- toYaml $probe -}}
{{- end -}}

{{/* The KV-events config JSON for --kv-events-config (vLLM's keys). */}}
{{- define "switchyard.kvEventsConfig" -}}
{{- dict "enable_kv_cache_events" true "publisher" "zmq" "endpoint" (printf "tcp://*:%v" .Values.servingEngineSpec.kvEventsPort) "topic" "kv-events" | toJson -}}
{{- end -}}

{{/* The models to deploy (enabled, engines on). */}}
{{- define "switchyard.enabledModels" -}}
{{- $models := list -}}
{{- if .Values.servingEngineSpec.enableEngine -}}
{{- range .Values.servingEngineSpec.modelSpec -}}
{{- if (ne (toString .enabled) "false") -}}
{{- $models = append $models . -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $models -}}
{{- end -}}

{{/* An env var from a secret value: a string lives in the chart's Secret under `key`; an
     object names an existing Secret. Call with (dict "root" $ "env" NAME "value" V "key" K). */}}
{{- define "switchyard.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      {{- if kindIs "string" .value }}
      name: {{ include "switchyard.fullname" .root }}-secrets
      key: {{ .key }}
      {{- else }}
      name: {{ .value.secretName }}
      key: {{ .value.secretKey }}
      {{- end }}
{{- end -}}
