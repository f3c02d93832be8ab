{{/*
Names, labels and the values the templates share. Nothing here renders an object.
*/}}

{{- define "outpost-webhook.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The object name prefix. Kept at 52 characters so that "-webhook-configuration" and the other
suffixes still make a valid name.
*/}}
{{- define "outpost-webhook.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "outpost-webhook.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "outpost-webhook.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: outpost-webhook
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/*
The webhook pods' labels, which the Deployment, Services, PodDisruptionBudget and NetworkPolicy
select on. Never app.kubernetes.io/managed-by: goauthentik.io, the registration's objectSelector,
so the webhook can never be asked to admit its own pods' owner.
*/}}
{{- define "outpost-webhook.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outpost-webhook.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end -}}

{{- define "outpost-webhook.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the serving certificate (tls.mode self and cert-manager). */}}
{{- define "outpost-webhook.tlsSecret" -}}
{{- if eq .Values.tls.mode "secret" -}}
{{- required "tls.mode=secret needs tls.secretName: the Secret (keys tls.crt, tls.key) holding the webhook's serving certificate" .Values.tls.secretName -}}
{{- else -}}
{{- .Values.tls.secretName | default (printf "%s-tls" (include "outpost-webhook.fullname" .)) -}}
{{- end -}}
{{- end -}}

{{/*
The Secrets the policy reads, as a JSON list of names: each rule's env secretKeyRef and secret
volumes, as the binary's Policy::secret_names finds them. The cluster view watches each by name,
so each watched namespace's Role grants exactly these.
*/}}
{{- define "outpost-webhook.policySecrets" -}}
{{- $policy := fromYaml .Values.policy -}}
{{- if hasKey $policy "Error" -}}
{{- fail (printf "policy is not YAML: %s" (get $policy "Error")) -}}
{{- end -}}
{{- if not (kindIs "slice" $policy.rules) -}}
{{- fail "policy: rules must be a list (docs/policy.md; `outpost-webhook policy check` says more)" -}}
{{- end -}}
{{- $names := list -}}
{{- range $rule := $policy.rules -}}
{{- $deployment := dig "deployment" dict $rule -}}
{{- range $env := (dig "env" list $deployment) -}}
{{- $name := dig "valueFrom" "secretKeyRef" "name" "" $env -}}
{{- if $name -}}{{- $names = append $names $name -}}{{- end -}}
{{- end -}}
{{- range $volume := (dig "volumes" list $deployment) -}}
{{- $name := dig "secret" "secretName" "" $volume -}}
{{- if $name -}}{{- $names = append $names $name -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- $names | uniq | sortAlpha | toJson -}}
{{- end -}}

{{/* The registration's name, which tls.mode self passes to the webhook. */}}
{{- define "outpost-webhook.registration" -}}
{{- include "outpost-webhook.fullname" . -}}
{{- end -}}

{{/*
Fails early, with a message that says what to do, on values the schema cannot judge alone.
*/}}
{{- define "outpost-webhook.validate" -}}
{{- if eq .Values.tls.mode "secret" -}}
{{- if not .Values.tls.secretName -}}
{{- fail "tls.mode=secret needs tls.secretName: the Secret (keys tls.crt, tls.key) holding the webhook's serving certificate" -}}
{{- end -}}
{{- if not .Values.tls.caBundle -}}
{{- fail "tls.mode=secret needs tls.caBundle: the base64 of the PEM CA that signed tls.secretName's certificate (base64 -w0 certs/ca.crt)" -}}
{{- end -}}
{{- if not (contains "-----BEGIN CERTIFICATE-----" (b64dec .Values.tls.caBundle)) -}}
{{- fail "tls.caBundle must be base64 of PEM certificates (-----BEGIN CERTIFICATE-----); it does not decode to one" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.tls.caBundle (ne .Values.tls.mode "secret") -}}
{{- fail (printf "tls.caBundle is used only with tls.mode=secret; with %s the caBundle is filled in the cluster" .Values.tls.mode) -}}
{{- end -}}
{{- if has .Release.Namespace .Values.watchNamespaces -}}
{{- fail (printf "watchNamespaces holds the release namespace %s: install the webhook in a namespace of its own" .Release.Namespace) -}}
{{- end -}}
{{- /*
Against a live cluster (install, upgrade, or --dry-run=server), a watched namespace that does not
exist would fail the install halfway, at its Role. Say so before anything is created. kube-system
always exists there; `helm template` and client-side dry runs have no cluster, and lookup returns
nothing for either.
*/ -}}
{{- if lookup "v1" "Namespace" "" "kube-system" -}}
{{- range .Values.watchNamespaces -}}
{{- if not (lookup "v1" "Namespace" "" .) -}}
{{- fail (printf "watchNamespaces: namespace %s does not exist. Install authentik first, or set watchNamespaces to where it runs" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
