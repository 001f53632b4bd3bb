"""KubeRay manifests for ray_app: render a RayJob from a config, validate any RayCluster/RayJob.

The Helm chart cluster/chart is the one source of the manifests; Python only fills its values.
Modules, one job each:
  storage   places a run's checkpoints and outputs on the cluster's shared storage
  values    the chart values of a RayJob for a validated config (sizing, placement, secrets)
  helm      finds the chart and helm, runs `helm template`
  render    config -> values -> `helm template` -> manifests
  schemas   loads the KubeRay v1.7.0 CRD schemas shipped in crds/
  validate  checks a manifest: the CRD schema, then the rules in rules.py (needs jsonschema)
  rules     KubeRay's controller rules the schema cannot express, and this project's rules
  cli       the `ray-app k8s render|validate` subcommands
"""
