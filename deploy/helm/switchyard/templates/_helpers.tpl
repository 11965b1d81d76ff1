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
model: {{ include "switchyard.modelLabel" .model | quote }}
{{- end -}}

{{/* A model's pod label `model` (the router's disaggregated_prefill sorts engines by
     it): labels.model when set, else its name. Call with the modelSpec. */}}
{{- define "switchyard.modelLabel" -}}
{{- $l := default (dict) .labels -}}
{{- default .name $l.model -}}
{{- end -}}

{{/* The NixlConnector --kv-transfer-config of a modelSpec's kvTransfer. */}}
{{- define "switchyard.nixlTransferConfig" -}}
{{- dict "kv_connector" (default "NixlConnector" .kvConnector) "kv_role" (default "kv_both" .kvRole) | toJson -}}
{{- end -}}

{{/* Labels of one model's objects and pods. Call with (dict "root" $ "model" $modelSpec). */}}
{{- define "switchyard.engineLabels" -}}
{{ include "switchyard.engineDiscoveryLabels" .root }}
model: {{ include "switchyard.modelLabel" .model | quote }}
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

{{/* The shared KV cache tier --------------------------------------------------------- */}}

{{- define "switchyard.cacheServerName" -}}
{{- printf "%s-cache-server" (include "switchyard.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "switchyard.cacheServerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: cache-server
{{- end -}}

{{- define "switchyard.cacheServerLabels" -}}
{{ include "switchyard.cacheServerSelectorLabels" . }}
{{ include "switchyard.commonLabels" . }}
{{- range $k, $v := .Values.cacheserverSpec.labels }}
{{ $k }}: {{ $v | quote }}
{{- end }}
{{- end -}}

{{/* The app.kubernetes.io/component values the engines' ServiceMonitor and PodMonitor
     select: the engines, and the cache server when it is deployed. */}}
{{- define "switchyard.scrapedComponents" -}}
{{- $c := list -}}
{{- if .Values.servingEngineSpec.enableEngine -}}
{{- $c = append $c "engine" -}}
{{- end -}}
{{- if .Values.cacheserverSpec.enabled -}}
{{- $c = append $c "cache-server" -}}
{{- end -}}
{{- toJson $c -}}
{{- end -}}

{{/* A Kubernetes quantity (2, 1.5Gi, 500M) as a whole number of bytes. Call with
     (dict "q" QUANTITY "what" VALUE-PATH). */}}
{{- define "switchyard.quantityBytes" -}}
{{- if not (kindIs "string" .q) -}}
{{- printf "%d" (int64 .q) -}}
{{- else -}}
{{- $q := .q -}}
{{- $num := regexFind "^([0-9]+(\\.[0-9]+)?|\\.[0-9]+)" $q -}}
{{- $suffix := trimPrefix $num $q -}}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 "E" 1000000000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 "Ei" 1152921504606846976 -}}
{{- if or (not $num) (not (hasKey $units $suffix)) -}}
{{- fail (printf "%s: %q is not a byte quantity (e.g. 4Gi, 500M, 1073741824)" .what $q) -}}
{{- end -}}
{{- printf "%d" (int64 (floor (mulf $num (get $units $suffix)))) -}}
{{- end -}}
{{- end -}}

{{/* The cache server's --max-bytes: maxBytes, else 3/4 of the memory limit (or request),
     else 1 GiB. */}}
{{- define "switchyard.cacheServerMaxBytes" -}}
{{- $c := .Values.cacheserverSpec -}}
{{- $res := default (dict) $c.resources -}}
{{- $mem := "" -}}
{{- $what := "" -}}
{{- if and $res.limits $res.limits.memory -}}
{{- $mem = $res.limits.memory -}}
{{- $what = "cacheserverSpec.resources.limits.memory" -}}
{{- else if and $res.requests $res.requests.memory -}}
{{- $mem = $res.requests.memory -}}
{{- $what = "cacheserverSpec.resources.requests.memory" -}}
{{- end -}}
{{- if and $c.maxBytes (ne (toString $c.maxBytes) "0") -}}
{{- include "switchyard.quantityBytes" (dict "q" $c.maxBytes "what" "cacheserverSpec.maxBytes") -}}
{{- else if $mem -}}
{{- $bytes := include "switchyard.quantityBytes" (dict "q" $mem "what" $what) -}}
{{- printf "%d" (div (mul (int64 $bytes) 3) 4) -}}
{{- else -}}
1073741824
{{- end -}}
{{- end -}}

{{/* A model's LMCACHE_REMOTE_URL: lmcacheConfig.remoteUrl, else the chart's cache server
     when enabled, else empty (no remote tier). Call with (dict "root" $ "lmc" $lmcacheConfig). */}}
{{- define "switchyard.lmcacheRemoteUrl" -}}
{{- if .lmc.remoteUrl -}}
{{- .lmc.remoteUrl -}}
{{- else if .root.Values.cacheserverSpec.enabled -}}
{{- printf "lm://%s.%s.svc.cluster.local:%v" (include "switchyard.cacheServerName" .root) .root.Release.Namespace .root.Values.cacheserverSpec.servicePort -}}
{{- end -}}
{{- end -}}

{{/* The --kv-transfer-config JSON for LMCache. Call with the model's lmcacheConfig. */}}
{{- define "switchyard.kvTransferConfig" -}}
{{- dict "kv_connector" "LMCacheConnectorV1" "kv_role" (default "kv_both" .kvRole) | toJson -}}
{{- end -}}

{{/*
Graceful termination for a pod spec: the grace period. Takes a spec with
terminationGracePeriodSeconds / preStopSleepSeconds.
*/}}
{{- define "switchyard.terminationGrace" -}}
terminationGracePeriodSeconds: {{ int .terminationGracePeriodSeconds }}
{{- end }}

{{/*
The container's preStop sleep (nothing when preStopSleepSeconds is 0).
*/}}
{{- define "switchyard.preStop" -}}
{{- if gt (int .preStopSleepSeconds) 0 }}
lifecycle:
  preStop:
    sleep:
      seconds: {{ int .preStopSleepSeconds }}
{{- end }}
{{- end }}

{{/*
--shutdown-timeout for a Switchyard process: what the grace period leaves after the
preStop sleep, less 5 s of margin, at least 1.
*/}}
{{- define "switchyard.shutdownTimeout" -}}
{{- max 1 (sub (int .terminationGracePeriodSeconds) (add (int .preStopSleepSeconds) 5)) -}}
{{- end }}

{{/* A list of labels, given as a list or a comma-separated string, as one comma list. */}}
{{- define "switchyard.labelList" -}}
{{- if kindIs "slice" . -}}
{{- join "," . -}}
{{- else -}}
{{- default "" . -}}
{{- end -}}
{{- end -}}
