{{/* Name of the RayCluster or RayJob: `name` or the release name, cut to KubeRay's limit
     (53 characters for a RayCluster, 47 for a RayJob: MaxRayClusterNameLength and
     MaxRayJobNameLength in ray-operator/controllers/ray/utils/constant.go, v1.7.0). */}}
{{- define "ray-finetune.name" -}}
{{- $max := ternary 47 53 (eq .Values.kind "RayJob") -}}
{{- default .Release.Name .Values.name | trunc $max | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every Ray pod of this release; the NetworkPolicy selects the pods by them. */}}
{{- define "ray-finetune.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ray-finetune.labels" -}}
{{ include "ray-finetune.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* "true" when this release renders Ray pods: a RayCluster, or a RayJob with a cluster of its own. */}}
{{- define "ray-finetune.hasPods" -}}
{{- if eq .Values.kind "RayJob" -}}
{{- not .Values.job.cluster -}}
{{- else -}}
{{- .Values.rayCluster.enabled -}}
{{- end -}}
{{- end -}}

{{- define "ray-finetune.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end -}}

{{/* The job's config, mounted from the ConfigMap <name>-config (kind: RayJob with job.config). */}}
{{- define "ray-finetune.jobConfig" -}}
{{- if and (eq .Values.kind "RayJob") .Values.job.config -}}/etc/ray-app{{- end -}}
{{- end -}}

{{/* Env shared by every Ray container. The token env (RAY_AUTH_MODE, RAY_AUTH_TOKEN) is
     injected by KubeRay from authOptions, so it is not repeated here.
     RAY_APP_STORAGE: where runs keep checkpoints and outputs (ray-app reads it as the default
     for relative storage paths). RAY_TRAIN_ENABLE_STATE_TRACKING: the dashboard's Train page
     lists the runs. */}}
{{- define "ray-finetune.env" -}}
- name: HF_HOME
  value: {{ .Values.huggingFace.home | quote }}
- name: RAY_APP_STORAGE
  value: {{ .Values.storage.uri | default .Values.storage.mountPath | quote }}
- name: RAY_TRAIN_ENABLE_STATE_TRACKING
  value: "1"
{{- if .Values.huggingFace.tokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.huggingFace.tokenSecret }}
      key: {{ .Values.huggingFace.tokenKey }}
      optional: true
{{- end }}
{{- range .Values.secretEnv }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
      optional: true
{{- end }}
{{- end -}}

{{/* Volumes of every Ray pod: /dev/shm in memory (NCCL, object store), the shared PVC and,
     for a RayJob, its config. Call with (dict "root" $ "shm" <sizeLimit>). */}}
{{- define "ray-finetune.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .shm }}
    sizeLimit: {{ . }}
    {{- end }}
- name: shared
  persistentVolumeClaim:
    claimName: {{ .root.Values.storage.claimName }}
{{- if include "ray-finetune.jobConfig" .root }}
- name: config
  configMap:
    name: {{ include "ray-finetune.name" .root }}-config
{{- end }}
{{- end -}}

{{- define "ray-finetune.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: shared
  mountPath: {{ .Values.storage.mountPath }}
{{- with include "ray-finetune.jobConfig" . }}
- name: config
  mountPath: {{ . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* preStop for workers. Kubernetes runs it before SIGTERM, inside the grace period:
     1. `ray drain-node` tells Ray this node goes away (reason PREEMPTION, with a deadline), so
        Ray Train sees a preemption notice and can checkpoint and reschedule its workers.
     2. It then waits until no Ray task or actor runs here (idle workers show as ray::IDLE),
        or until the deadline, whichever comes first. Without `ps` it waits the full deadline.
     After it returns, the container gets SIGTERM and `ray start --block` exits. */}}
{{- define "ray-finetune.preStop" -}}
exec:
  command:
    - /bin/bash
    - -c
    - |
      deadline={{ .Values.gracefulShutdown.drainDeadlineSeconds }}
      timeout 30 ray drain-node --address "$RAY_ADDRESS" \
        --reason DRAIN_NODE_REASON_PREEMPTION \
        --reason-message "pod $HOSTNAME is terminating" \
        --deadline-remaining-seconds "$deadline" || echo "preStop: ray drain-node failed"
      end=$((SECONDS + deadline))
      while [ "$SECONDS" -lt "$end" ]; do
        if command -v ps >/dev/null && ! ps -eo args= | grep '^ray::' | grep -qv '^ray::IDLE'; then
          break
        fi
        sleep 5
      done
{{- end -}}

{{/* Pod-level fields shared by the head and the workers. Ray pods need no Kubernetes API, so no
     service account token is mounted (the autoscaler sidecar gets its own, see clusterSpec).
     Call with (dict "root" $ "group" <values of the group>). */}}
{{- define "ray-finetune.podPlacement" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* One workerGroupSpecs entry. Call with (dict "root" $ "group" <values of the group>). */}}
{{- define "ray-finetune.workerGroup" -}}
{{- $root := .root -}}
{{- $g := .group -}}
- groupName: {{ $g.groupName }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  {{- /* KubeRay accepts these two only with autoscaler v2 (utils/validation.go:1005-1027, 1112-1142). */}}
  {{- if and $root.Values.autoscaler.enabled (eq $root.Values.autoscaler.version "v2") }}
  idleTimeoutSeconds: {{ $root.Values.autoscaler.idleTimeoutSeconds }}
  priority: {{ $g.priority }}
  {{- end }}
  rayStartParams: {}
  {{- with $g.rayResources }}
  resources:
    {{- range $k, $v := . }}
    {{ $k }}: {{ $v | toString | quote }}
    {{- end }}
  {{- end }}
  {{- with $g.rayLabels }}
  labels:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "ray-finetune.labels" $root | nindent 8 }}
      {{- with $g.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      terminationGracePeriodSeconds: {{ $root.Values.gracefulShutdown.terminationGracePeriodSeconds }}
      {{- include "ray-finetune.podPlacement" . | nindent 6 }}
      containers:
        - name: ray-worker
          image: {{ include "ray-finetune.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          env:
            {{- include "ray-finetune.env" $root | nindent 12 }}
          resources:
            {{- $res := deepCopy $g.resources }}
            {{- if gt (int $g.gpus) 0 }}
            {{- $_ := set $res.requests "nvidia.com/gpu" (int $g.gpus) }}
            {{- $_ := set $res.limits "nvidia.com/gpu" (int $g.gpus) }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          lifecycle:
            preStop:
              {{- include "ray-finetune.preStop" $root | nindent 14 }}
          volumeMounts:
            {{- include "ray-finetune.volumeMounts" $root | nindent 12 }}
      volumes:
        {{- include "ray-finetune.volumes" (dict "root" $root "shm" $g.shmSizeLimit) | nindent 8 }}
{{- end -}}

{{/* The RayCluster spec: the body of a RayCluster, and a RayJob's rayClusterSpec. */}}
{{- define "ray-finetune.clusterSpec" -}}
rayVersion: {{ .Values.rayVersion | quote }}
{{- if .Values.auth.enabled }}
authOptions:
  mode: token
  secretName: {{ .Values.auth.secretName }}
{{- end }}
enableInTreeAutoscaling: {{ .Values.autoscaler.enabled }}
{{- if .Values.autoscaler.enabled }}
autoscalerOptions:
  version: {{ .Values.autoscaler.version }}
  upscalingMode: {{ .Values.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ .Values.autoscaler.idleTimeoutSeconds }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  resources:
    {{- toYaml .Values.autoscaler.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  # The autoscaler sidecar is the only container that talks to the Kubernetes API. The head
  # pod mounts no token, so this gives one to the sidecar alone (KubeRay appends these mounts
  # to it: common/pod.go:1021-1023, v1.7.0), at the path the Ray autoscaler reads
  # (ray/autoscaler/_private/kuberay/node_provider.py:61-62, Ray 2.60). Job code in the Ray
  # container cannot use the autoscaler's permissions.
  volumeMounts:
    - name: kube-api-access
      mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      readOnly: true
{{- end }}
{{- if .Values.gcsFaultTolerance.enabled }}
gcsFaultToleranceOptions:
  redisAddress: {{ .Values.gcsFaultTolerance.redisAddress | quote }}
  redisPassword:
    valueFrom:
      secretKeyRef:
        name: {{ .Values.gcsFaultTolerance.redisPasswordSecret.name }}
        key: {{ .Values.gcsFaultTolerance.redisPasswordSecret.key }}
{{- end }}
headGroupSpec:
  # Reachable only inside the cluster; use `kubectl port-forward` (docs/kuberay.md).
  serviceType: ClusterIP
  rayStartParams:
    {{- range $k, $v := .Values.head.rayStartParams }}
    {{ $k }}: {{ $v | toString | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "ray-finetune.labels" . | nindent 8 }}
      {{- with .Values.head.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- include "ray-finetune.podPlacement" (dict "root" . "group" .Values.head) | nindent 6 }}
      containers:
        - name: ray-head
          image: {{ include "ray-finetune.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          securityContext:
            {{- toYaml .Values.containerSecurityContext | nindent 12 }}
          ports:
            - {containerPort: 6379, name: gcs-server}
            - {containerPort: 8265, name: dashboard}
            - {containerPort: 10001, name: client}
            - {containerPort: 8080, name: metrics}
          env:
            {{- include "ray-finetune.env" . | nindent 12 }}
            {{- with .Values.head.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          resources:
            {{- toYaml .Values.head.resources | nindent 12 }}
          volumeMounts:
            {{- include "ray-finetune.volumeMounts" . | nindent 12 }}
      volumes:
        {{- include "ray-finetune.volumes" (dict "root" . "shm" .Values.head.shmSizeLimit) | nindent 8 }}
        {{- if .Values.autoscaler.enabled }}
        # The same token, CA and namespace files Kubernetes mounts by default, for the sidecar.
        - name: kube-api-access
          projected:
            sources:
              - serviceAccountToken: {path: token, expirationSeconds: 3607}
              - configMap:
                  name: kube-root-ca.crt
                  items: [{key: ca.crt, path: ca.crt}]
              - downwardAPI:
                  items: [{path: namespace, fieldRef: {fieldPath: metadata.namespace}}]
        {{- end }}
workerGroupSpecs:
  {{- range $role, $group := .Values.workerGroups }}
  {{- if $group.enabled }}
  {{- include "ray-finetune.workerGroup" (dict "root" $ "group" $group) | nindent 2 }}
  {{- end }}
  {{- end }}
{{- end -}}
