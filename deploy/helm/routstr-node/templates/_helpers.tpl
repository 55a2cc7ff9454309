{{/* Names, labels and the pieces every pod of the chart shares. */}}

{{- define "routstr-node.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "routstr-node.fullname" -}}
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

{{- define "routstr-node.selectorLabels" -}}
app.kubernetes.io/name: {{ include "routstr-node.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "routstr-node.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "routstr-node.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: routstr-node
{{- end -}}

{{/* The settings variable holding each service's port. */}}
{{- define "routstr-node.portKey" -}}
{{- get (dict "gateway" "PORT" "billing" "BILLING_PORT" "wallet" "WALLET_PORT" "discovery" "DISCOVERY_PORT") . -}}
{{- end -}}

{{- define "routstr-node.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "routstr-node.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "routstr-node.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding each service's NATS password (key = service name), or "" when there is none. */}}
{{- define "routstr-node.natsSecretName" -}}
{{- if .Values.natsAuth.existingSecret -}}
{{- .Values.natsAuth.existingSecret -}}
{{- else if .Values.natsAuth.passwords -}}
{{- printf "%s-nats" (include "routstr-node.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "routstr-node.secretName" -}}
{{- default (include "routstr-node.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{/* env entry for one secret variable: from secretRefs, else from the chart's or the existing Secret. */}}
{{- define "routstr-node.secretEnv" -}}
{{- $ref := get .root.Values.secretRefs .name -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      {{- if $ref }}
      name: {{ $ref.name }}
      key: {{ $ref.key }}
      {{- else }}
      name: {{ .secretName | default (include "routstr-node.secretName" .root) }}
      key: {{ .name }}
      optional: true
      {{- end }}
{{- end -}}

{{- define "routstr-node.podSecurity" -}}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{- define "routstr-node.containerSecurity" -}}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{- end -}}

{{- define "routstr-node.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "routstr-node.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpVolume.sizeLimit }}
{{- end -}}
