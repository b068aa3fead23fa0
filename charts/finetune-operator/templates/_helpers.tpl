{{/* Names, labels and the derived settings every template shares. */}}

{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.fullname" -}}
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

{{/* Cluster-scoped objects (ClusterRole, ClusterRoleBinding) carry the release namespace in their
name, so that the same release name in two namespaces does not collide. */}}
{{- define "finetune-operator.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "finetune-operator.fullname" .) | trunc 253 }}
{{- end }}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "finetune-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* "true" when replicas > 1: the operator runs with --peering and the replicas elect one leader. */}}
{{- define "finetune-operator.peering" -}}
{{- if gt (int .Values.replicas) 1 }}true{{ end }}
{{- end }}

{{/* The kopf peering name: the name of the ClusterKopfPeering, or of the KopfPeering in each watched
namespace. */}}
{{- define "finetune-operator.peeringName" -}}
{{- include "finetune-operator.fullname" . }}
{{- end }}

{{/* "true" when the operator watches the whole cluster (no watchNamespaces). */}}
{{- define "finetune-operator.clusterwide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
What the operator does in the namespaces it watches, from its code: kube.py (creates and deletes
worker pods, Services and ConfigMaps; merge-patches the FinetuneJob status), kopf's handlers in
handlers.py (watches FinetuneJobs and worker pods; patches FinetuneJobs for its finalizer and
annotations; posts Events), and the children's ownerReferences with blockOwnerDeletion (update on
finetunejobs/finalizers, checked where the OwnerReferencesPermissionEnforcement admission plugin runs).
tests/test_rbac.py derives the same set from the code and fails when the two differ. No Secrets:
workers read S3 credentials through secretKeyRef, which the kubelet resolves.
*/}}
{{- define "finetune-operator.namespacedRules" -}}
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["create", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* kopf peering: it watches the peering objects and patches its own one (keep-alives). */}}
{{- define "finetune-operator.peeringRules" -}}
{{- $resource := ternary "clusterkopfpeerings" "kopfpeerings" (eq (include "finetune-operator.clusterwide" .) "true") -}}
- apiGroups: ["kopf.dev"]
  resources: [{{ $resource | quote }}]
  verbs: ["list", "watch"]
- apiGroups: ["kopf.dev"]
  resources: [{{ $resource | quote }}]
  resourceNames: [{{ include "finetune-operator.peeringName" . | quote }}]
  verbs: ["patch"]
{{- end }}

{{/* kopf's cluster observation (kopf/_core/reactor/observation.py): it watches CRDs to notice
resources that appear or change, and, when it serves a list of namespaces, the namespaces. */}}
{{- define "finetune-operator.scanningRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if not (include "finetune-operator.clusterwide" .) }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}

{{/* The GPU memory from the nodes' nvidia.com/gpu.memory labels (gpuMemoryFromNodes): kopf's index of
nodes, a cluster-scoped resource, which kopf lists and watches cluster-wide in either scope. */}}
{{- define "finetune-operator.nodeRules" -}}
{{- if .Values.gpuMemoryFromNodes }}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
