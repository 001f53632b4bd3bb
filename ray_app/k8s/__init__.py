"""KubeRay manifests for ray_app: render a RayJob from a config, validate any RayCluster/RayJob.

Modules, one job each:
  schemas   loads the KubeRay v1.7.0 CRD schemas shipped in crds/
  validate  checks a manifest: the CRD schema, then the rules in rules.py
  rules     KubeRay's controller rules and this project's rules for fine-tuning clusters
  render    builds a RayJob (plus the ConfigMap holding the config) from a fine-tune config
  cli       the `ray-app k8s render|validate` subcommands
"""
