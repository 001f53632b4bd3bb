{{/* RayCluster name: clusterName or the release name, cut to KubeRay's 53-character limit. */}}
{{- define "ray-finetune.clusterName" -}}
{{- default .Release.Name .Values.clusterName | trunc 53 | trimSuffix "-" -}}
{{- end -}}

{{- define "ray-finetune.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ray-finetune.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end -}}

{{/* Env shared by every Ray container. The token env (RAY_AUTH_MODE, RAY_AUTH_TOKEN) is
     injected by KubeRay from authOptions, so it is not repeated here. */}}
{{- define "ray-finetune.env" -}}
- name: HF_HOME
  value: {{ .Values.huggingFace.home | quote }}
{{- if .Values.huggingFace.tokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.huggingFace.tokenSecret }}
      key: {{ .Values.huggingFace.tokenKey }}
      optional: true
{{- end }}
{{- end -}}

{{/* Volumes of every Ray pod: /dev/shm in memory (NCCL, object store) and the shared PVC.
     Call with (dict "root" $ "shm" <sizeLimit>). */}}
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
{{- end -}}

{{- define "ray-finetune.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: shared
  mountPath: {{ .Values.storage.mountPath }}
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

{{/* One workerGroupSpecs entry. Call with (dict "root" $ "group" <values of the group>). */}}
{{- define "ray-finetune.workerGroup" -}}
{{- $root := .root -}}
{{- $g := .group -}}
- groupName: {{ $g.groupName }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  {{- if $root.Values.autoscaler.enabled }}
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
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
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
